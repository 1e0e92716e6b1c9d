"""`headct tune`: Optuna over fine-tuning learning rates, pruning, the best-params file, concurrent workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from headct.config import ConfigError, JobContext, TuneConfig, load_params
from tests.conftest import REPO, runs_of
from tests.finetune_helpers import finetune_cfg, make_labelled_project

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tune_cfg(root: Path, **kw) -> TuneConfig:
    base = dict(storage=f"sqlite:///{root}/optuna.db", study_name="t", n_trials=3, epochs=2,
                backbone_lr=(1e-6, 1e-3), head_lr=(1e-5, 1e-1), n_startup_trials=1, pruner_startup_trials=1,
                pruner_warmup_epochs=0, best_params=root / "params/tuned/finetune.yaml",
                report_dir=root / "reports/tune")
    return TuneConfig(**{**base, **kw})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_labelled_project(tmp_path / "proj")


def test_three_trial_tune_prunes_and_finetune_reads_the_best_params(project: Path, job_ctx: JobContext) -> None:
    import optuna

    from pipelines import tune as job

    ctx = JobContext(root=project, tracking=job_ctx.tracking)
    cfg = tune_cfg(project)
    # A strong first trial and a weak second one (the third is TPE's), so the median rule has something to prune.
    study = job.create_study(cfg, project)
    study.enqueue_trial({"backbone_lr": 4e-5, "head_lr": 0.09, "weight_decay": 0.03})
    study.enqueue_trial({"backbone_lr": 1e-6, "head_lr": 1e-5, "weight_decay": 0.0})
    result = job.run(cfg, ctx, finetune=finetune_cfg(project, epochs=1))
    study = optuna.load_study(study_name="t", storage=cfg.storage)
    states = [t.state for t in study.trials]
    assert len(states) == 3 and result["trials"] == 3
    assert optuna.trial.TrialState.PRUNED in states, states  # the MedianPruner acted on the reported AUROC
    assert len(study.trials[0].intermediate_values) == 2  # the first trial ran all its epochs

    best = yaml.safe_load(cfg.best_params.read_text())["finetune"]
    assert best == {k: pytest.approx(study.best_trial.params[k]) for k in ("backbone_lr", "head_lr", "weight_decay")}
    (project / "params.yaml").write_text("finetune:\n  epochs: 4\n")
    params, _ = load_params(root=project)
    assert params.finetune.head_lr == pytest.approx(best["head_lr"])  # the tuned file's values apply
    assert (params.finetune.weight_decay, params.finetune.epochs) == (pytest.approx(best["weight_decay"]), 4)
    (project / "params.yaml").write_text("finetune:\n  head_lr: 0.5\n")  # would be silently replaced: refused
    with pytest.raises(ConfigError, match="finetune.head_lr set here"):
        load_params(root=project)

    runs = runs_of(ctx)
    parents = [r for r in runs if r.data.tags.get("headct.job") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["optuna.state"] for c in children} == {"COMPLETE", "PRUNED"}


def test_two_worker_processes_share_one_sqlite_study(project: Path, job_ctx: JobContext) -> None:
    import optuna

    from pipelines import tune as job

    cfg = tune_cfg(project, n_trials=4, epochs=1, pruner_startup_trials=10)
    job.create_study(cfg, project)  # the study (and, by job_ctx, the MLflow store) exist before the workers
    params = {"tracking": {"uri": job_ctx.tracking.uri, "experiment": job_ctx.tracking.experiment},
              "finetune": {**finetune_cfg(project, epochs=1).model_dump(mode="json")},
              "tune": cfg.model_dump(mode="json")}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import cli; cli.main()", "tune"]
    workers = [subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="t", storage=cfg.storage)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert cfg.best_params.is_file()
    runs = runs_of(JobContext(root=project, tracking=job_ctx.tracking))
    assert sum(r.data.tags.get("headct.job") == "tune" for r in runs) == 2  # one tune run per worker
    assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 4  # one child run per trial


def test_automatic_study_name_follows_the_inputs_not_the_tuned_values(project: Path) -> None:
    from pipelines.tune import auto_study_name

    cfg, base = tune_cfg(project, study_name=None), finetune_cfg(project)
    name = auto_study_name(cfg, base)
    assert name.startswith("headct-finetune-") and name == auto_study_name(cfg, base)
    assert auto_study_name(cfg, base.model_copy(update={"head_lr": 0.5})) == name  # a tuned value: same study
    assert auto_study_name(cfg, base.model_copy(update={"epochs": 9})) != name
    assert auto_study_name(cfg.model_copy(update={"head_lr": (1e-4, 1e-3)}), base) != name
    train = project / "data/splits/t/train.csv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:-1]) + "\n")  # one scan fewer: other data, another study
    assert auto_study_name(cfg, base) != name
