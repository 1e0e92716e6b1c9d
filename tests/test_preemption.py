"""Preemption outside Slurm: a real SIGUSR1/SIGTERM delivered to a running job mid-epoch stops it at the next step
boundary with a checkpoint and exit status 75; the next invocation resumes and ends where an uninterrupted run
does (same per-step losses, same weights, same val AUROCs). headct/train/preemption.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from headct.config import JobContext
from headct.train import checkpoint, preemption
from headct.train.engine import adamw, train
from tests.finetune_helpers import finetune_cfg, make_labelled_project
from tests.pretrain_helpers import ctx_for, make_cfg, make_project

REPO = Path(__file__).resolve().parent.parent


def _toy(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    return model, adamw(model, 1e-2, 0.01)


def _batches(start: int, total: int):
    for step in range(start, total):  # a function of the step, like the project's samplers
        g = torch.Generator().manual_seed(step)
        yield torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)


def _loss(model):
    return lambda batch, step, micro: torch.nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_a_trapped_signal_stops_the_engine_after_that_step_with_a_checkpoint_and_resume_is_exact(
    tmp_path: Path, signame: str
) -> None:
    model, opt = _toy()
    whole = train(model, opt, _batches(0, 10), _loss(model), start_step=0, total_steps=10, lr_at=lambda s: 1e-2)

    model, opt = _toy()
    path = tmp_path / "last.pt"
    saved = []

    def save(done, stats):
        checkpoint.save_checkpoint(path, model, opt, done, {"run": 1}, {"losses": list(stats.losses)})
        saved.append(done)
        return path

    def on_step(done):
        if done == 4:  # the signal arrives while step 4 is being finished: steps 0..3 are complete
            os.kill(os.getpid(), getattr(signal, signame))

    before = signal.getsignal(signal.SIGUSR1)
    with preemption.PreemptionGuard(), pytest.raises(preemption.Preempted) as stopped:
        train(model, opt, _batches(0, 10), _loss(model), start_step=0, total_steps=10, lr_at=lambda s: 1e-2,
              checkpoint_every=100, save_checkpoint=save, on_step=on_step)
    assert signal.getsignal(signal.SIGUSR1) is before  # the guard gives the previous handler back
    assert (stopped.value.step, stopped.value.signal_name, stopped.value.checkpoint) == (4, signame, str(path))
    assert saved == [4]  # the only checkpoint: the stop's (checkpoint_every is 100)

    model, opt = _toy(seed=1)  # other initial weights: everything must come from the checkpoint
    state = checkpoint.load_checkpoint(path)
    start = checkpoint.restore(state, model, opt)
    rest = train(model, opt, _batches(start, 10), _loss(model), start_step=start, total_steps=10,
                 lr_at=lambda s: 1e-2)
    assert start == 4 and [*state["extra"]["losses"], *rest.losses] == whole.losses  # bit for bit


def test_without_a_guard_the_engine_never_looks_for_a_stop() -> None:
    assert not preemption.active()
    model, opt = _toy()
    with preemption.PreemptionGuard() as guard:
        assert preemption.active()
        guard.received = "SIGTERM"
    assert not preemption.active() and preemption.stop_requested() is None
    stats = train(model, opt, _batches(0, 3), _loss(model), start_step=0, total_steps=3, lr_at=lambda s: 1e-2)
    assert stats.end_step == 3


def test_requeue_asks_slurm_only_for_rank_0_of_a_slurm_job() -> None:
    # scontrol itself is exercised on a real single-node Slurm in tests/test_slurm.py.
    assert "not under Slurm" in preemption.requeue({})
    assert "rank 0" in preemption.requeue({"SLURM_JOB_ID": "7", "RANK": "1"})


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _signal_at_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send this process and its children (data workers) SIGUSR1 right after the periodic checkpoint of `step` (a
    preemption notice arriving while the next step runs; Slurm signals every process of the step)."""
    save = checkpoint.save_checkpoint

    def save_then_signal(path, model, optimizer, done, config, extra=None):
        save(path, model, optimizer, done, config, extra)
        if done == step:
            for child in _children(os.getpid()):
                os.kill(child, signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_signal)


@pytest.mark.parametrize("workers", [0, 1])
def test_pretrain_signalled_mid_epoch_resumes_on_the_uninterrupted_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    from pipelines.pretrain import run

    root = make_project(tmp_path)
    whole = run(make_cfg(root, checkpoint_every=2, checkpoint_dir=root / "ckpt_a", model_dir=root / "models/a",
                         report_dir=root / "reports/a", register_as=None), ctx_for(root))
    cfg = make_cfg(root, checkpoint_every=2, checkpoint_dir=root / "ckpt_b", model_dir=root / "models/b",
                   report_dir=root / "reports/b", register_as=None, workers=workers)
    _signal_at_checkpoint(monkeypatch, step=2)
    with pytest.raises(preemption.Preempted) as stopped:
        run(cfg, ctx_for(root))
    monkeypatch.undo()
    # 8 train scans / batch 2 = 4 steps an epoch: stopped after step 3 of epoch 1, its checkpoint written then.
    assert stopped.value.step == 3 and stopped.value.signal_name == "SIGUSR1"
    (last,) = (root / "ckpt_b").glob("*/last.pt")
    assert stopped.value.checkpoint == str(last) and checkpoint.load_checkpoint(last)["step"] == 3
    out = run(cfg, ctx_for(root))
    assert out["resumed_from_step"] == 3
    a, b = (checkpoint.load_checkpoint(next((root / f"ckpt_{x}").glob("*/complete.pt"))) for x in "ab")
    assert a["extra"]["losses"] == b["extra"]["losses"]  # the same loss trajectory, step for step
    assert out["weights_sha256"] == whole["weights_sha256"]


def test_finetune_signalled_mid_epoch_resumes_inside_that_epoch_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, job_ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.data.augment as augment
    from pipelines import finetune as job

    project = make_labelled_project(tmp_path / "p")
    ctx = JobContext(root=project, tracking=job_ctx.tracking)

    def cfg(tag: str):
        return finetune_cfg(project, epochs=2, checkpoint_dir=project / f"ckpt-{tag}",
                            out_dir=project / f"models/{tag}", report_dir=project / f"reports/{tag}")

    job.run(cfg("whole"), ctx)
    real, calls = augment.augment_hu, []

    def augment_then_signal(*args, **kwargs):  # 6 train scans / batch 2: steps 0-2 are epoch 0, 3-5 epoch 1
        calls.append(1)
        if len(calls) == 5:  # during step 4, the second of epoch 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(augment, "augment_hu", augment_then_signal)
    with pytest.raises(preemption.Preempted) as stopped:
        job.run(cfg("stopped"), ctx)
    monkeypatch.undo()
    assert stopped.value.step == 5 and stopped.value.signal_name == "SIGTERM"
    (last,) = (project / "ckpt-stopped").glob("*/last.pt")
    state = checkpoint.load_checkpoint(last)
    assert state["step"] == 5 and state["extra"]["epoch"] == 0 and len(state["extra"]["epoch_losses"]) == 2
    resumed = job.run(cfg("stopped"), ctx)
    assert resumed["resumed_after_epoch"] == 1
    history = [json.loads((project / f"reports/{t}/history.json").read_text()) for t in ("whole", "stopped")]
    assert history[0] == history[1]  # val AUROCs and the epochs' mean train losses, both epochs
    scores = [pd.read_csv(project / f"reports/{t}/predictions.csv")["score"].to_numpy() for t in ("whole", "stopped")]
    assert np.array_equal(scores[0], scores[1])


@pytest.mark.slow
def test_headct_pretrain_signalled_from_outside_exits_75_and_the_same_command_resumes(tmp_path: Path) -> None:
    """The command line end to end: `headct pretrain` in its own process, SIGUSR1 from this one once the first
    periodic checkpoint exists (so mid-run, at a step nobody chose), exit 75, then the same command resumes."""
    from pipelines.pretrain import run

    root = make_project(tmp_path)
    section = make_cfg(root, samples=240, checkpoint_every=5).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": section,
                                                      "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}))
    cmd = [sys.executable, str(REPO / "cli.py"), "pretrain"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a safety net for a hung job, not a timed assertion
    while not list((root / "ckpt").glob("*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == preemption.EXIT_CODE, out[-3000:]
    assert "SIGUSR1 received: stopped after global step" in out and "not under Slurm" in out
    stopped_at = checkpoint.load_checkpoint(next((root / "ckpt").glob("*/last.pt")))["step"]
    assert 5 <= stopped_at < 120  # 240 samples / batch 2 = 120 steps
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    metrics = json.loads((root / "reports/pretrain/metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == 120
    whole = run(make_cfg(root, samples=240, checkpoint_every=5, checkpoint_dir=root / "ckpt_ref",
                         model_dir=root / "models/ref", report_dir=root / "reports/ref"), ctx_for(root))
    assert metrics["weights_sha256"] == whole["weights_sha256"]
    a, b = (checkpoint.load_checkpoint(next((root / d).glob("*/complete.pt"))) for d in ("ckpt", "ckpt_ref"))
    assert a["extra"]["losses"] == b["extra"]["losses"]


def test_a_preempted_tune_keeps_its_finished_trials_and_retries_the_interrupted_one(
    tmp_path: Path, job_ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two trials on Optuna's JournalStorage (the job-array storage); SIGTERM during trial 1's first epoch."""
    import optuna

    import headct.data.augment as augment
    from headct.config import TuneConfig
    from pipelines import tune as job

    project = make_labelled_project(tmp_path / "p")
    ctx = JobContext(root=project, tracking=job_ctx.tracking)
    journal = project / "shared" / "tune.journal"
    cfg = TuneConfig(storage=f"journal:{journal}", study_name="t", n_trials=2, epochs=1, n_startup_trials=1,
                     pruner_startup_trials=5, best_params=project / "params/tuned/finetune.yaml",
                     report_dir=project / "reports/tune")
    base = finetune_cfg(project, epochs=1)
    real, calls = augment.augment_hu, []

    def augment_then_signal(*args, **kwargs):  # 3 steps a trial: the 5th call is step 1 of trial 1
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(augment, "augment_hu", augment_then_signal)
    with pytest.raises(preemption.Preempted):
        job.run(cfg, ctx, finetune=base)
    monkeypatch.undo()
    storage = job._storage(cfg.storage)
    first = optuna.load_study(study_name="t", storage=storage).trials
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL"]
    assert first[1].user_attrs[job.PREEMPTED_ATTR] == "SIGTERM after step 2"

    result = job.run(cfg, ctx, finetune=base)
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # trial 0 kept, not run again
    assert trials[0].value == first[0].value and trials[0].datetime_complete == first[0].datetime_complete
    assert trials[2].params == first[1].params and trials[2].user_attrs[job.RETRY_ATTR] == 1
    assert result["trials_complete"] == 2
    job.run(cfg, ctx, finetune=base)  # the study is full: nothing retried twice, nothing added
    assert len(optuna.load_study(study_name="t", storage=storage).trials) == 3
