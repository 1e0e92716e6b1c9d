"""The pre-training data path, engine and `headct pretrain` job on a tiny store of random head-like volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headct.config import PretrainConfig
from headct.data.augment import augment_hu
from headct.data.volumes import StepBatchSampler, VolumeDataset, epoch_order
from headct.errors import InputError
from headct.train.engine import NonFiniteLossError, step_generator, train
from tests.pretrain_helpers import SIZE, ctx_for, make_cfg, make_project

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", n_scans=2)


# ------------------------------------------------------------------------------------------- data path
def test_sampler_resumes_mid_epoch_at_exactly_the_right_sample() -> None:
    full = list(StepBatchSampler(10, 3, seed=4, start_step=0, total_steps=9))
    assert list(StepBatchSampler(10, 3, seed=4, start_step=5, total_steps=9)) == full[5:]
    stream = [i for batch in full for i in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] == list(epoch_order(10, 4, 0)) and stream[10:20] != stream[:10]
    ranks = [list(StepBatchSampler(10, 3, 4, 0, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0][0] + ranks[1][0] == stream[:6]  # two ranks split one global batch


def test_dataset_returns_int16_and_checks_every_scan_before_training(project: Path) -> None:
    volumes = sorted((project / "data/store/t/volumes").glob("*.npy"))
    ids = [p.stem for p in volumes]
    ds = VolumeDataset(volumes[:2], ids[:2], (SIZE, SIZE, SIZE))
    hu, scan = ds[1]
    assert hu.dtype == torch.int16 and hu.shape == (SIZE, SIZE, SIZE) and scan == ids[1]
    ds.check()
    with pytest.raises(InputError, match=rf"{ids[0]}\.npy: shape \[32, 32, 32\] differs from the model's"):
        VolumeDataset(volumes[:1], ids[:1], (16, 16, 16)).check()
    with pytest.raises(InputError, match=rf"{ids[1]}\.npy: the split names this file as scan '{ids[0]}'"):
        VolumeDataset(volumes[1:2], ids[:1]).check()


def test_augmentation_is_a_function_of_the_generator() -> None:
    hu = torch.randint(-1024, 2000, (6, 8, 8, 8), dtype=torch.int16)
    a = augment_hu(hu, step_generator(0, 3), True, 5.0, 0.02)
    assert torch.equal(a, augment_hu(hu, step_generator(0, 3), True, 5.0, 0.02))
    assert not torch.equal(a, augment_hu(hu, step_generator(0, 4), True, 5.0, 0.02))
    plain = augment_hu(hu, step_generator(0, 3), flip_lr=False)
    assert torch.equal(plain, hu.float())
    flipped = augment_hu(hu, step_generator(0, 3), flip_lr=True)
    assert all(torch.equal(f, h.float()) or torch.equal(f, h.flip(0).float()) for f, h in zip(flipped, hu, strict=True))


# --------------------------------------------------------------------------------------------- engine
def _toy(n_steps: int, accum: int = 1, bad_at: int | None = None, **kw):
    """A linear model trained by the engine on 6 fixed batches; the loss is infinite at step `bad_at`.
    Returns (model, stats or the NonFiniteLossError raised, {completed steps: weights saved at a checkpoint},
    [(step, logged metrics)])."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(6, 4, 4)
    saved, logged = {}, []

    def loss_fn(batch: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        loss = model(batch).square().mean()
        return loss * float("inf") if step == bad_at else loss

    try:
        stats = train(model, opt, iter(data), loss_fn, start_step=0, total_steps=n_steps, lr_at=lambda s: 0.1,
                      accum_steps=accum, on_log=lambda s, m: logged.append((s, m)),
                      save_checkpoint=lambda done, _: saved.__setitem__(done, model.weight.detach().clone()), **kw)
        return model, stats, saved, logged
    except NonFiniteLossError as err:
        return model, err, saved, logged


def test_gradient_accumulation_matches_the_full_batch() -> None:
    m1, s1, _, _ = _toy(4)
    m2, s2, _, _ = _toy(4, accum=2)
    assert np.allclose(s1.losses, s2.losses, rtol=1e-6)
    assert torch.allclose(m1.weight, m2.weight, atol=1e-7)


def test_logged_loss_is_the_exact_mean_of_the_steps_since_the_last_log() -> None:
    _, stats, saved, logged = _toy(6, log_every=4, checkpoint_every=3)
    assert [s for s, _ in logged] == [4, 6] and sorted(saved) == [3, 6]
    assert len(stats.losses) == 6 and logged[0][1]["loss"] == sum(stats.losses[:4]) / 4
    assert logged[1][1]["loss"] == (stats.losses[4] + stats.losses[5]) / 2 and logged[1][1]["lr"] == 0.1


def test_non_finite_loss_aborts_naming_the_step_before_any_checkpoint_of_it() -> None:
    _, _, saved_before, _ = _toy(2, checkpoint_every=2)  # the state after steps 0 and 1
    _, err, saved, logged = _toy(6, bad_at=2, checkpoint_every=2, log_every=20)
    assert isinstance(err, NonFiniteLossError)
    assert "loss is inf at global step 2" in str(err) and "stopped at step 4" in str(err)
    assert list(saved) == [2] and torch.equal(saved[2], saved_before[2])  # only the state before the divergence
    assert logged == []


@pytest.mark.parametrize("start", [0.0, 0.04])
def test_the_weight_decay_schedule_drives_the_decayed_group_even_from_zero(start: float) -> None:
    """DINO's weight decay rises by cosine from `pretrain.weight_decay`; a start of 0 must rise too. The groups
    are told apart by their "decay" mark, never by their current value."""
    from headct.train.engine import adamw
    from headct.train.schedules import dino_weight_decay

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    optimizer = adamw(model, lr=1e-2, weight_decay=start)
    assert [g["decay"] for g in optimizer.param_groups] == [True, False]
    seen = []

    def loss_fn(batch: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        seen.append([g["weight_decay"] for g in optimizer.param_groups])  # what this step's update uses
        return model(batch).square().mean()

    total = 5
    train(model, optimizer, iter(torch.randn(total, 2, 4)), loss_fn, start_step=0, total_steps=total,
          lr_at=lambda s: 1e-2, wd_at=lambda s: dino_weight_decay(s, total, start, 0.4))
    assert seen == [[pytest.approx(dino_weight_decay(s, total, start, 0.4)), 0.0] for s in range(total)]
    assert seen[-1][0] == pytest.approx(0.4)
    bare = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.1}])  # built by hand, unmarked
    with pytest.raises(ValueError, match="param group 0 has no 'decay' mark"):
        train(model, bare, iter(torch.randn(1, 2, 4)), loss_fn, start_step=0, total_steps=1, lr_at=lambda s: 1e-2,
              wd_at=lambda s: 0.1)



def test_resuming_a_checkpoint_written_before_groups_were_marked_keeps_the_marks() -> None:
    from headct.train.checkpoint import restore, rng_state
    from headct.train.engine import adamw

    model = torch.nn.Linear(4, 2)
    optimizer = adamw(model, lr=1e-3, weight_decay=0.0)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["decay"]  # as an optimizer state saved before the "decay" mark existed
    state = {"model": model.state_dict(), "optimizer": saved, "rng": rng_state(), "step": 3}
    fresh = adamw(model, lr=1e-3, weight_decay=0.0)
    assert restore(state, model, fresh) == 3
    assert [g["decay"] for g in fresh.param_groups] == [True, False]


# ------------------------------------------------------------------------------------------------ job
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One real job run (8 steps of 2), shared: later tests resume against its checkpoint."""
    from pipelines.pretrain import run

    root = make_project(tmp_path_factory.mktemp("pretrain") / "proj")
    return root, run(make_cfg(root, figure_every=4), ctx_for(root))


def test_pretrain_job_writes_model_dir_metrics_figures_and_mlflow_run(trained: tuple[Path, dict]) -> None:
    from headct.models.model_dir import load_model_dir
    from pipelines.pretrain import load_data

    project, out = trained
    assert out["steps"] == 8 and out["samples"] == 16
    metrics = json.loads((project / "reports/pretrain/metrics.json").read_text())
    for key in ("heldout_loss_start", "heldout_loss_end", "steps", "samples", "seconds", "volumes_per_s",
                "data_wait_fraction"):
        assert key in metrics
    assert metrics["heldout_loss_end"] < metrics["heldout_loss_start"]  # it learned something
    for name in ("loss_curve.png", "pretext.png"):
        assert (project / "reports/pretrain" / name).stat().st_size > 1000
    encoder, config = load_model_dir(project / "models/mae")
    assert config["method"] == "mae" and config["preprocess"]["shape"] == [SIZE] * 3
    assert [w["name"] for w in config["windows"]] == ["brain", "subdural", "bone"]
    assert config["provenance"]["data"]["heldout_scans"] == 2 and encoder.patch_size == 16
    data = load_data(make_cfg(project), ctx_for(project))
    assert not set(data.heldout_ids) & set(data.train_ids)  # the check runs on volumes never trained on
    assert len(data.train_ids) == 8 + 4 - 2  # train + the rest of val
    assert len(load_data(make_cfg(project, use_val=False), ctx_for(project)).train_ids) == 8
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ctx_for(project).tracking.uri)
    experiment = client.get_experiment_by_name(ctx_for(project).tracking.experiment)
    run = client.search_runs([experiment.experiment_id], "tags.`headct.job` = 'pretrain'",
                             order_by=["attributes.start_time ASC"])[0]  # the fixture's run, the first
    assert run.info.status == "FINISHED"
    registered = client.get_model_version(out["registered"]["name"], out["registered"]["version"])
    assert registered.tags["run_id"] == run.info.run_id  # the registered version points at this run
    # Named for what it is; the model card in the model directory says what the registry description says.
    assert run.info.run_name == f"pretrain mae vit-tiny p16 {SIZE}^3"
    card = (project / "models/mae/README.md").read_text()
    assert registered.description and card.endswith(registered.description)
    for fact in ("## Data", "- store: t", "## Preprocessing", "## Recipe", "- method: MAE",
                 "## Held-out metrics", f"at end: {metrics['heldout_loss_end']:.4g}"):
        assert fact in card, fact
    assert run.info.run_id not in card and "volumes/s" not in card  # same inputs, same model directory
    assert str(project) not in card and "README.md" in {a.path.split("/")[-1] for a in
                                                        client.list_artifacts(run.info.run_id, "model")}
    headline = json.loads((project / "reports/pretrain/headline.json").read_text())
    assert headline["heldout_loss_end"] == round(metrics["heldout_loss_end"], 6)
    assert {"loss", "lr", "volumes_per_s", "data_wait_fraction", "heldout_loss"} <= set(run.data.metrics)
    heldout = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "heldout_loss")]
    assert sorted(heldout) == [(0, pytest.approx(metrics["heldout_loss_start"])),
                               (8, pytest.approx(metrics["heldout_loss_end"]))]
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    # A reconstruction PNG every `figure_every` steps (4 of 8: the end one is the report's own figure).
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/step_0000004.png"]


def test_pretraining_reads_the_pool_and_records_the_patients_it_trained_on(tmp_path: Path) -> None:
    from headct.models.model_dir import read_config
    from pipelines.pretrain import load_data, run

    root = make_project(tmp_path / "proj", n_scans=20)  # scans 12-19 are not in the split files yet
    splits = root / "data/splits/t"
    header, *rows = (splits / "train.csv").read_text().splitlines(keepends=True)
    make_row = lambda i: f"data/store/t/volumes/ser_{i:016x}.npy,ser_{i:016x},pat_{i // 2:016x},0\n"  # noqa: E731
    (splits / "pool.csv").write_text(header + "".join(make_row(i) for i in range(12, 16)))
    (splits / "test.csv").write_text(header + "".join(make_row(i) for i in range(16, 20)))
    pool_ids = [f"ser_{i:016x}" for i in range(12, 16)]
    train_ids = [r.split(",")[1] for r in rows]
    data = load_data(make_cfg(root, use_val=False), ctx_for(root))
    assert data.train_ids == train_ids + pool_ids  # train, then the pool; never val or test
    assert data.provenance["pool_scans"] == 4 and data.provenance["pool_patients"] == 2
    assert load_data(make_cfg(root, use_val=False, pool=False), ctx_for(root)).train_ids == train_ids
    run(make_cfg(root, use_val=False, samples=4, register_as=None), ctx_for(root))
    provenance = read_config(root / "models/mae")["provenance"]["data"]
    assert provenance["train_scans"] == 12 and provenance["train_patients"] == 6 and provenance["pool_patients"] == 2
    # A pool patient who is also a test patient would put an evaluation patient into pre-training: refused.
    (splits / "pool.csv").write_text(header + "".join(make_row(i) for i in range(12, 17)))
    with pytest.raises(InputError, match=r"pat_0{15}8.* in both test\.csv and pool\.csv"):
        load_data(make_cfg(root, use_val=False), ctx_for(root))


def test_finished_run_is_registered_as_champion_pyfunc_that_embeds_like_load_encoder(
    trained: tuple[Path, dict]
) -> None:
    import mlflow

    import headct
    from headct.registry import CHAMPION, register_encoder

    project, out = trained
    assert out["registered"] == {"name": "headct-encoder", "version": "1", "champion": True}
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("headct-encoder", CHAMPION)
    assert str(champion.version) == "1" and champion.tags["method"] == "mae"
    assert float(champion.tags["heldout_loss_end"]) < float(champion.tags["heldout_loss_start"])
    volumes = np.stack([np.load(p) for p in sorted((project / "data/store/t/volumes").glob("*.npy"))[:2]])
    served = mlflow.pyfunc.load_model(f"models:/headct-encoder@{CHAMPION}").predict(volumes)
    direct = headct.load_encoder(project / "models/mae").embed(volumes)
    assert served.shape == (2, 192) and np.allclose(served, direct, atol=1e-5)
    # A version whose held-out loss did not improve is registered but does not take the alias.
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("test").experiment_id):
        info = register_encoder(project / "models/mae", "headct-encoder", [SIZE] * 3, 192, promote=False, tags={})
    assert info["version"] == "2" and not info["champion"]
    assert str(client.get_model_version_by_alias("headct-encoder", CHAMPION).version) == "1"


class Interrupted(Exception):
    pass


def die_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the job's checkpoint writer raise Interrupted right after writing the checkpoint of `step`
    (a kill at the worst moment: the state is on disk, the process is gone)."""
    import headct.train.checkpoint as checkpoint

    save = checkpoint.save_checkpoint

    def save_then_die(path, model, optimizer, done, config, extra=None):
        save(path, model, optimizer, done, config, extra)
        if done == step:
            raise Interrupted

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)


def test_resumed_run_repeats_the_uninterrupted_one(
    trained: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.train.checkpoint as checkpoint
    from pipelines.pretrain import run

    root, _ = trained
    cfg = make_cfg(root, checkpoint_every=3, checkpoint_dir=root / "ckpt_b", model_dir=root / "models/b",
                   report_dir=root / "reports/b")  # checkpoint_every and paths do not change the trajectory
    die_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(Interrupted):
        run(cfg, ctx_for(root))
    monkeypatch.undo()
    (interrupted,) = (root / "ckpt_b").glob("*/last.pt")
    first = checkpoint.load_checkpoint(interrupted)["extra"]  # what the killed invocation had done
    assert first["samples"] == 3 * 2
    out = run(cfg, ctx_for(root))
    assert out["resumed_from_step"] == 3 and out["samples"] == 16
    # Time and samples add up over both invocations (5 more steps of 2), and the report gives those totals.
    total = checkpoint.load_checkpoint(next((root / "ckpt_b").glob("*/complete.pt")))["extra"]
    assert total["samples"] == first["samples"] + 5 * 2 and total["seconds"] > first["seconds"]
    assert out["seconds"] == round(total["seconds"], 2)
    assert out["volumes_per_s"] == round(total["samples"] / total["seconds"], 2)

    (a_path,) = (root / "ckpt").glob("*/complete.pt")  # finished runs are kept as complete.pt, never resumed
    (b_path,) = (root / "ckpt_b").glob("*/complete.pt")
    assert a_path.parent.name == b_path.parent.name  # same training identity -> same checkpoint folder
    a = checkpoint.load_checkpoint(a_path)
    b = checkpoint.load_checkpoint(b_path)
    assert a["step"] == b["step"] == 8
    assert np.allclose(a["extra"]["losses"], b["extra"]["losses"], rtol=1e-6, atol=0)
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=1e-6, atol=1e-7), key


def test_changed_config_trains_afresh_and_a_foreign_checkpoint_is_refused(trained: tuple[Path, dict]) -> None:
    import headct.train.checkpoint as checkpoint
    from pipelines.pretrain import _resume, run

    root, _ = trained
    before = sorted(p.parent.name for p in (root / "ckpt").glob("*/complete.pt"))
    out = run(make_cfg(root, lr=2e-3, model_dir=root / "models/c", report_dir=root / "reports/c"), ctx_for(root))
    assert out["resumed_from_step"] == 0  # a params change under `dvc repro` starts a new run, no manual cleanup
    after = sorted(p.parent.name for p in (root / "ckpt").glob("*/complete.pt"))
    assert set(before) < set(after)  # the old run's checkpoint is left alone
    # Re-running a finished configuration trains again (after a code change it must not re-emit old weights).
    again = run(make_cfg(root, model_dir=root / "models/d", report_dir=root / "reports/d"), ctx_for(root))
    assert again["resumed_from_step"] == 0
    # A checkpoint whose recorded settings differ from the run's is refused, naming the difference.
    finished = root / "ckpt" / before[0] / "complete.pt"
    state = checkpoint.load_checkpoint(finished)
    identity = {**state["config"], "lr": 0.002}
    with pytest.raises(InputError, match=r"different run.*lr: 0\.001 -> 0\.002"):
        _resume(finished, identity, None, None)


# ------------------------------------------------------------------------------------------------ DINO
DINO_SMALL = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops": 2, "local_size": 16}


def dino_cfg(root: Path, tag: str, **kw) -> PretrainConfig:
    return make_cfg(root, method="dino", dino=DINO_SMALL, checkpoint_dir=root / f"ckpt_{tag}",
                    model_dir=root / f"models/{tag}", report_dir=root / f"reports/{tag}", register_as=None, **kw)


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One DINO job run (8 steps of 2 on 16 scans), shared by the DINO job tests."""
    from pipelines.pretrain import run

    root = make_project(tmp_path_factory.mktemp("dino") / "proj", n_scans=16)
    return root, run(dino_cfg(root, "a"), ctx_for(root))


def dino_task(cfg: PretrainConfig, state: dict | None = None):
    """The DinoTask of `cfg` at the job's seeded initial weights, or with a checkpoint's model `state`."""
    from headct.models.vit import build_encoder
    from headct.train.pretext import DinoTask

    torch.manual_seed(cfg.seed)
    encoder = build_encoder({"name": cfg.arch, "img_size": [SIZE] * 3, "patch_size": cfg.patch_size, "in_chans": 3,
                             "num_registers": cfg.num_registers})
    task = DinoTask(cfg, encoder, torch.device("cpu"), 0, total_steps=8, steps_per_epoch=5)
    if state is not None:
        task.model.load_state_dict(state, strict=True)
    return task


def test_dino_start_and_end_heldout_losses_are_scored_with_the_same_centre(dino_run: tuple[Path, dict]) -> None:
    """The champion rule compares heldout_loss_start with heldout_loss_end. DINO's loss is centred and training
    moves the centre away from 0, so both ends must be scored with one centre (the final one): the start is the
    seeded initial model scored at the end."""
    import headct.train.checkpoint as checkpoint
    from pipelines.pretrain import load_data

    root, whole = dino_run
    cfg = dino_cfg(root, "a")
    data = load_data(cfg, ctx_for(root))
    hu = VolumeDataset(data.heldout_paths, data.heldout_ids).load_all()
    final = checkpoint.load_checkpoint(next((root / "ckpt_a").glob("*/complete.pt")))
    centre = final["model"]["loss_fn.center"]
    assert centre.abs().max() > 0  # training moved it from its zero start

    initial = dino_task(cfg)
    zero_centred = initial.heldout_loss(hu)  # what the start was scored with before: a zero centre
    with torch.no_grad():
        initial.model.loss_fn.center.copy_(centre)
    assert whole["heldout_loss_start"] == pytest.approx(initial.heldout_loss(hu), rel=1e-5)
    assert whole["heldout_loss_start"] != pytest.approx(zero_centred, rel=1e-3)
    assert whole["heldout_loss_end"] == pytest.approx(dino_task(cfg, final["model"]).heldout_loss(hu), rel=1e-5)


def test_dino_job_resumes_exactly_and_saves_the_teacher_encoder(
    dino_run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.train.checkpoint as checkpoint
    from headct.models.model_dir import load_model_dir
    from headct.train.distributed import weights_digest
    from pipelines.pretrain import run

    root, whole = dino_run

    def cfg(tag: str, **kw) -> PretrainConfig:
        return dino_cfg(root, tag, **kw)

    assert whole["method"] == "dino" and whole["steps"] == 8
    assert (root / "reports/a/pretext.png").stat().st_size > 1000
    encoder, config = load_model_dir(root / "models/a")
    assert config["method"] == "dino"
    die_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(Interrupted):
        run(cfg("b", checkpoint_every=3), ctx_for(root))
    monkeypatch.undo()
    resumed = run(cfg("b", checkpoint_every=3), ctx_for(root))
    assert resumed["resumed_from_step"] == 3
    a = checkpoint.load_checkpoint(next((root / "ckpt_a").glob("*/complete.pt")))
    b = checkpoint.load_checkpoint(next((root / "ckpt_b").glob("*/complete.pt")))
    assert np.allclose(a["extra"]["losses"], b["extra"]["losses"], rtol=1e-6, atol=0)
    for key, value in a["model"].items():  # student, teacher (EMA) and the centre buffer
        assert torch.allclose(value, b["model"][key], rtol=1e-6, atol=1e-7), key
    # The model directory holds the teacher's encoder (the EMA network DINO evaluates), not the student's.
    teacher = {k.removeprefix("teacher.encoder."): v for k, v in a["model"].items() if k.startswith("teacher.encoder.")}
    student = {k.removeprefix("student.encoder."): v for k, v in a["model"].items() if k.startswith("student.encoder.")}
    assert all(torch.equal(encoder.state_dict()[k], teacher[k]) for k in teacher)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    # The reported digest is the digest of the final weights (student, teacher, centre), not just any digest.
    assert whole["weights_sha256"] == weights_digest(dino_task(cfg("a"), a["model"]).model)
    assert whole["heldout_feature_spread"] > 1e-3  # above the collapse line (pretext.COLLAPSE_SPREAD)


def test_a_collapsed_dino_encoder_is_detected(tmp_path: Path) -> None:
    from headct.models.vit import build_encoder
    from headct.train.pretext import COLLAPSE_SPREAD, DinoTask

    root = make_project(tmp_path / "proj", n_scans=4)
    torch.manual_seed(0)
    encoder = build_encoder({"name": "tiny", "img_size": SIZE, "patch_size": 16, "in_chans": 3, "depth": 1})
    task = DinoTask(make_cfg(root, method="dino", dino=DINO_SMALL), encoder, torch.device("cpu"), 0, 10, 5)
    hu = torch.from_numpy(np.stack([np.load(p) for p in sorted((root / "data/store/t/volumes").glob("*.npy"))]))
    assert task.feature_spread(hu) > COLLAPSE_SPREAD
    with torch.no_grad():  # every input -> one point: the final norm outputs its bias only
        task.encoder.norm.weight.zero_()
        task.encoder.norm.bias.fill_(0.3)
    assert task.feature_spread(hu) < COLLAPSE_SPREAD
