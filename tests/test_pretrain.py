"""The pre-training data path, engine and `headct pretrain` job on a tiny store of random head-like volumes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from headct.config import JobContext, PreprocessSpec, PretrainConfig, TrackingConfig
from headct.data.augment import augment_hu
from headct.data.volumes import StepBatchSampler, VolumeDataset, epoch_order
from headct.errors import InputError
from headct.train.engine import NonFiniteLossError, step_generator, train
from tests.store_helpers import write_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")


SIZE = 32


def make_project(root: Path, n_scans: int = 16) -> Path:
    """A store of n_scans 32^3 int16 volumes (air, skull shell, brain, a blob), 2 scans per patient, and a
    split: train 8 scans, val 4, test = an unreadable file (the job must never open it)."""
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    rows, volumes, patients = [], {}, {}
    for i in range(n_scans):
        dist = np.sqrt(((g - rng.uniform(-0.1, 0.1, (3, 1, 1, 1))) ** 2).sum(0))
        vol = np.where(dist < 0.75, 1000.0, -1024.0)
        vol[dist < 0.65] = 35.0
        vol += rng.normal(0, 5, vol.shape)
        scan = f"ser_{i:016x}"
        volumes[scan], patients[scan] = vol.astype(np.int16), f"pat_{i // 2:016x}"
        rows.append(f"data/store/t/volumes/{scan}.npy,{scan},pat_{i // 2:016x},{i % 3 == 0:d}\n")
    write_store(root / "data/store/t", volumes, patients, PreprocessSpec(shape=(SIZE, SIZE, SIZE), spacing_mm=6.0))
    splits = root / "data/splits/t"
    splits.mkdir(parents=True)
    header = "img_path,scan_id,patient_id,ICH\n"
    (splits / "train.csv").write_text(header + "".join(rows[:8]))
    (splits / "val.csv").write_text(header + "".join(rows[8:12]))
    (splits / "test.csv").write_text("this is not a split file\n")
    (splits / "split.json").write_text(json.dumps({"store": "data/store/t", "seed": 0}))
    return root


def make_cfg(root: Path, **kw) -> PretrainConfig:
    base = dict(splits=root / "data/splits/t", model_dir=root / "models/mae", checkpoint_dir=root / "ckpt",
                report_dir=root / "reports/pretrain", arch="tiny", patch_size=16, batch_size=2, samples=16,
                lr=1e-3, eval_volumes=2, log_every=2, checkpoint_every=100, threads=1)
    return PretrainConfig(**{**base, **kw})


def ctx_for(root: Path) -> JobContext:
    return JobContext(root=root, tracking=TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", experiment="test"))


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
    for name in ("loss_curve.png", "mae_reconstruction.png"):
        assert (project / "reports/pretrain" / name).stat().st_size > 1000
    encoder, config = load_model_dir(project / "models/mae")
    assert config["method"] == "mae" and config["preprocess"]["shape"] == [SIZE] * 3
    assert [w["name"] for w in config["windows"]] == ["brain", "subdural", "bone"]
    assert config["provenance"]["data"]["heldout_scans"] == 2 and encoder.patch_size == 16
    data = load_data(make_cfg(project), ctx_for(project))
    assert not set(data.heldout_ids) & set(data.train_ids)  # the check runs on volumes never trained on
    assert len(data.train_ids) == 8 + 4 - 2  # train + the rest of val
    assert len(load_data(make_cfg(project, use_val=False), ctx_for(project)).train_ids) == 8
    with sqlite3.connect(project / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM runs WHERE name = 'pretrain' AND status = 'FINISHED'").fetchall()
        keys = {r[0] for r in db.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", runs[0])}
    assert {"loss", "lr", "volumes_per_s", "data_wait_fraction", "heldout_loss"} <= keys
    assert list(project.glob(f"mlartifacts/**/{runs[0][0]}/artifacts/model/model.safetensors"))
    # A reconstruction PNG every `figure_every` steps (4 of 8: the end one is the report's own figure).
    (snapshot,) = project.glob(f"mlartifacts/**/{runs[0][0]}/artifacts/figures/step_*.png")
    assert snapshot.name == "step_0000004.png" and snapshot.stat().st_size > 1000


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
    out = run(cfg, ctx_for(root))
    assert out["resumed_from_step"] == 3 and out["samples"] == 16
    assert out["seconds"] > 0  # training time of both invocations, not only the resumed one

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


def test_dino_job_resumes_exactly_and_saves_the_teacher_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.train.checkpoint as checkpoint
    from headct.models.model_dir import load_model_dir
    from headct.train.distributed import weights_digest
    from pipelines.pretrain import run

    root = make_project(tmp_path / "proj", n_scans=16)

    def cfg(tag: str, **kw) -> PretrainConfig:
        return make_cfg(root, method="dino", dino=DINO_SMALL, checkpoint_dir=root / f"ckpt_{tag}",
                        model_dir=root / f"models/{tag}", report_dir=root / f"reports/{tag}", register_as=None, **kw)

    whole = run(cfg("a"), ctx_for(root))
    assert whole["method"] == "dino" and whole["steps"] == 8
    assert (root / "reports/a/dino_views.png").stat().st_size > 1000
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
    assert weights_digest(encoder)
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
