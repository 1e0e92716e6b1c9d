"""Heads, the classifier directory, the fine-tuning loop and the `headct finetune` job on a tiny store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headct.config import FinetuneConfig, JobContext, PreprocessSpec, load_params
from headct.data.volumes import class_balanced_weights
from headct.errors import InputError
from headct.eval import PREDICTION_COLUMNS
from headct.models.heads import AttentivePoolHead, Classifier, LinearHead
from headct.models.model_dir import save_model_dir
from headct.models.vit import build_encoder
from headct.train.finetune import masked_bce, param_groups, pos_weights
from tests.conftest import runs_of
from tests.store_helpers import write_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 32
TINY_ARCH = {"name": "tiny", "img_size": [SIZE] * 3, "patch_size": 16, "in_chans": 3, "embed_dim": 32,
             "depth": 1, "num_heads": 2}
WINDOWS = [{"name": "brain", "level": 40, "width": 80}, {"name": "subdural", "level": 80, "width": 200},
           {"name": "bone", "level": 600, "width": 2800}]


def make_labelled_project(root: Path, n_patients: int = 12) -> Path:
    """A 32^3 store, 1 scan per patient, labels ICH (a bright blob: learnable) and SDH (noise), a split of
    6 train / 3 val / 3 test patients, and a tiny pre-trained-looking model directory."""
    rng = np.random.default_rng(0)
    spec = PreprocessSpec(shape=(SIZE, SIZE, SIZE), spacing_mm=6.0)
    preprocess = {**spec.model_dump(mode="json"), "version": spec.version}
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    dist = np.sqrt((g ** 2).sum(0))
    rows, volumes = [], {}
    ich = [1, 0] * (n_patients // 2)
    sdh = [1, 1, 0, 0] * (n_patients // 4)
    for i in range(n_patients):
        vol = np.where(dist < 0.75, 1000.0, -1024.0)
        vol[dist < 0.65] = 35.0
        if ich[i]:
            vol[np.sqrt(((g - np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 0.2] = 70.0
        vol += rng.normal(0, 5, vol.shape)
        scan = f"ser_{i:016x}"
        volumes[scan] = vol.astype(np.int16)
        rows.append(f"data/store/t/volumes/{scan}.npy,{scan},pat_{i:016x},{ich[i]},{sdh[i]}\n")
    write_store(root / "data/store/t", volumes, {s: f"pat_{s[4:]}" for s in volumes}, spec)
    splits = root / "data/splits/t"
    splits.mkdir(parents=True)
    header = "img_path,scan_id,patient_id,ICH,SDH\n"
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    train, val, test = order[:6], [6, 7, 9], [8, 10, 11]  # val: ICH 1,0,0 SDH 0,0,1 ... see asserts below
    for name, idx in (("train", train), ("val", val), ("test", test)):
        (splits / f"{name}.csv").write_text(header + "".join(rows[i] for i in idx))
    (splits / "split.json").write_text(json.dumps({"store": "data/store/t", "seed": 0}))
    torch.manual_seed(0)
    save_model_dir(root / "models/mae", build_encoder(TINY_ARCH),
                   {"preprocess": preprocess, "windows": WINDOWS, "method": "mae", "provenance": {}})
    return root


def finetune_cfg(root: Path, **kw) -> FinetuneConfig:
    base = dict(splits=root / "data/splits/t", model_dir=root / "models/mae", out_dir=root / "models/classifier",
                report_dir=root / "reports/finetune", checkpoint_dir=root / "ckpt", tuned_params=None,
                epochs=2, batch_size=2, backbone_lr=1e-4, head_lr=1e-2, warmup_frac=0.0, bootstrap=20,
                min_positives=1, threads=1, eval_batch_size=4)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_project(tmp_path_factory.mktemp("ft") / "proj")


# ------------------------------------------------------------------------------------------------ heads
def test_heads_map_tokens_to_logits_and_linear_head_has_no_affine_bn() -> None:
    tokens = torch.randn(4, 1 + 8, 32)
    head = LinearHead(32, 3)
    assert head(tokens[:, 0]).shape == (4, 3)
    assert head.norm.weight is None and head.norm.bias is None and not head.norm.affine
    assert torch.all(head.linear.bias == 0) and head.linear.weight.std() < 0.05
    attentive = AttentivePoolHead(32, 3, num_heads=3)  # 3 does not divide 32: reduced to 2
    assert attentive(tokens[:, 1:]).shape == (4, 3) and attentive.attention.num_heads == 2
    encoder = build_encoder(TINY_ARCH)
    x = torch.rand(2, 3, SIZE, SIZE, SIZE)
    for pool, kind in (("cls", "linear"), ("mean", "linear"), ("attentive", "attentive")):
        model = Classifier(encoder, pool, 5)
        assert model(x).shape == (2, 5) and model.head_type == kind


def test_resnet_backbone_gives_tokens_and_logits() -> None:
    from headct.models.resnet import ResNetBackbone

    backbone = ResNetBackbone("resnet10", in_chans=3)
    tokens = backbone.forward_features(torch.rand(2, 3, SIZE, SIZE, SIZE))
    assert tokens.shape[0] == 2 and tokens.shape[2] == 512 and tokens.shape[1] >= 2
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-5)
    assert Classifier(backbone, "attentive", 2)(torch.rand(2, 3, SIZE, SIZE, SIZE)).shape == (2, 2)


# ------------------------------------------------------------------------------------------------ loss, sampling
def test_class_weights_are_negatives_over_positives_and_unknowns_are_masked() -> None:
    targets = np.array([[1, 0], [0, np.nan], [0, 1], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(pos_weights(targets), [3.0, 2.0])
    logits = torch.tensor([[2.0, 100.0], [-1.0, -100.0]])
    t = torch.tensor([[1.0, np.nan], [0.0, np.nan]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]),
                                                                    pos_weight=torch.tensor(3.0))
    assert torch.isclose(masked_bce(logits, t, torch.tensor([3.0, 2.0])), expected)
    p = class_balanced_weights(np.array([[1], [0], [0], [0]], dtype=np.float32))
    assert np.isclose(p[0], 0.5) and np.isclose(p.sum(), 1.0)


def test_param_groups_hold_every_parameter_once_and_scale_one_schedule() -> None:
    from headct.train.engine import adamw, train

    model = Classifier(build_encoder(TINY_ARCH), "attentive", 2)
    groups = param_groups(model, backbone_lr=1e-4, head_lr=1e-2, weight_decay=0.05)
    assert {(g["part"], g["lr_scale"], g["weight_decay"]) for g in groups} == {
        ("backbone", 1e-4, 0.05), ("backbone", 1e-4, 0.0), ("head", 1e-2, 0.05), ("head", 1e-2, 0.0)}
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.head.query) in undecayed and id(model.backbone.cls_token) in undecayed
    # Backbone groups from elsewhere (e.g. layer-wise lr decay) ride the same schedule, scaled by backbone_lr.
    named = dict(model.backbone.named_parameters())
    layered = [{"params": [p for n, p in named.items() if n.startswith("blocks.")], "lr_scale": 0.5},
               {"params": [p for n, p in named.items() if not n.startswith("blocks.")], "weight_decay": 0.0}]
    groups = param_groups(model, 1e-4, 1e-2, 0.05, layered)
    optimizer = adamw(model, 1.0, 0.05, groups=groups)
    x = torch.rand(2, 3, SIZE, SIZE, SIZE)
    train(model, optimizer, [x], lambda batch, step, micro: model(batch).square().mean(), start_step=0,
          total_steps=1, lr_at=lambda step: 0.5)
    lrs = sorted((g["part"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups)
    assert lrs == sorted([("backbone", 0.5 * 1e-4 * 0.5, 0.05), ("backbone", 0.5 * 1e-4, 0.0),
                          ("head", 0.5 * 1e-2, 0.05), ("head", 0.5 * 1e-2, 0.0)])
    assert optimizer.defaults["betas"] == (0.9, 0.95)  # the pre-training convention (engine.adamw)
    with pytest.raises(ValueError, match=r"missing \['backbone.cls_token'"):
        param_groups(model, 1e-4, 1e-2, 0.05, layered[:1] + [{"params": [named["norm.weight"], named["norm.bias"],
                                                                         named["patch_embed.proj.weight"],
                                                                         named["patch_embed.proj.bias"]]}])


def test_config_accepts_a_single_label_and_rejects_micro_batches_of_one() -> None:
    assert FinetuneConfig(labels="ICH").labels == ["ICH"]
    with pytest.raises(ValueError, match="micro-batches"):
        FinetuneConfig(batch_size=2, accum_steps=2)


# ------------------------------------------------------------------------------------------------ the job
def test_finetune_job_writes_predictions_metrics_and_a_strict_classifier_dir(
    project: Path, job_ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.data.splits as splits
    import headct.train.finetune_data as finetune_data
    from headct.models.classifier_dir import load_classifier, predict_proba
    from pipelines import finetune as job

    events: list[str] = []
    real_read, real_fit = splits.read_split, finetune_data.train_classifier

    def spy_read(split_dir: Path, name: str) -> pd.DataFrame:
        events.append(f"read:{name}")
        return real_read(split_dir, name)

    def spy_train(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        events.append("trained")
        return out

    monkeypatch.setattr(splits, "read_split", spy_read)
    monkeypatch.setattr(finetune_data, "train_classifier", spy_train)
    ctx = JobContext(root=project, tracking=job_ctx.tracking)
    cfg = finetune_cfg(project, epochs=3)
    result = job.run(cfg, ctx)
    assert events == ["read:train", "read:val", "trained", "read:test"]  # test read once, after training

    table = pd.read_csv(cfg.report_dir / "predictions.csv", dtype={"k": str})
    assert tuple(table.columns) == PREDICTION_COLUMNS
    assert set(table["mode"]) == {"finetune"} and set(table["model"]) == {"pretrained"}
    assert set(table["split"]) == {"val", "test"} and set(table["label"]) == {"ICH", "SDH"}
    metrics = json.loads((cfg.report_dir / "metrics.json").read_text())
    history = json.loads((cfg.report_dir / "history.json").read_text())
    assert all((cfg.report_dir / n).is_file() for n in ("roc.png", "pr.png", "reliability.png")) and len(history) == 3
    for label, m in metrics["labels"].items():
        for key in ("auroc", "ap", "sensitivity", "specificity", "auroc_low", "auroc_high", "threshold"):
            assert key in m
        test_rows = table[(table["split"] == "test") & (table["label"] == label)]
        assert np.isclose(test_rows["threshold"].iloc[0], m["threshold"])
    # The kept model is the epoch with the best mean val AUROC (ties: earliest).
    means = [h["val_auroc_mean"] for h in history]
    assert result["best_epoch"] == int(np.argmax(means)) == metrics["best_epoch"]

    classifier, config = load_classifier(cfg.out_dir)
    assert config["labels"] == ["ICH", "SDH"] and config["pool"] == "mean" and config["head"] == "linear"
    assert set(config["thresholds"]) == {"ICH", "SDH"}
    test = pd.read_csv(cfg.splits / "test.csv")
    hu = np.stack([np.load(project / p) for p in test["img_path"]])
    probs = predict_proba(classifier, hu)
    for j, label in enumerate(config["labels"]):
        rows = table[(table["split"] == "test") & (table["label"] == label)]
        np.testing.assert_allclose(probs[:, j], rows["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    runs = runs_of(ctx)
    assert len(runs) == 1 and "val_auroc_mean" in runs[0].data.metrics
    assert (project / "ckpt").is_dir()

    weights = cfg.out_dir / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one flipped byte of the weights
    weights.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="SHA-256"):
        load_classifier(cfg.out_dir)


def test_classifier_dir_with_a_missing_key_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from headct.io import file_sha256
    from headct.models.classifier_dir import load_classifier, save_classifier

    model = Classifier(build_encoder(TINY_ARCH), "attentive", 1)
    save_classifier(tmp_path / "c", model, {"labels": ["ICH"], "thresholds": {"ICH": 0.5}, "windows": WINDOWS,
                                            "preprocess": {}})
    state = load_file(str(tmp_path / "c/model.safetensors"))
    state.pop("head.query")
    save_file(state, str(tmp_path / "c/model.safetensors"))
    config = json.loads((tmp_path / "c/config.json").read_text())
    config["weights_sha256"] = file_sha256(tmp_path / "c/model.safetensors")  # a consistent but incomplete dir
    (tmp_path / "c/config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"missing keys \['head.query'\]"):
        load_classifier(tmp_path / "c")


def test_random_init_single_label_run_with_freezing_and_balanced_sampling(project: Path, job_ctx: JobContext,
                                                                          tmp_path: Path) -> None:
    from pipelines import finetune as job

    cfg = finetune_cfg(project, init="random", labels="ICH", pool="attentive", epochs=2,
                       freeze_backbone_epochs=1, balanced_sampling=True, checkpoint_dir=None,
                       out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    result = job.run(cfg, JobContext(root=project, tracking=job_ctx.tracking))
    assert result["model"] == "random_init" and result["labels"] == ["ICH"]
    table = pd.read_csv(cfg.report_dir / "predictions.csv")
    assert set(table["model"]) == {"random_init"} and set(table["label"]) == {"ICH"}


def test_the_ceiling_trains_on_train_and_pool_and_names_itself(tmp_path: Path, job_ctx: JobContext) -> None:
    from headct.train.finetune_data import load_data
    from pipelines import finetune as job

    root = make_labelled_project(tmp_path / "proj", n_patients=16)  # patients 12-15 are in no split file
    splits = root / "data/splits/t"
    cfg = finetune_cfg(root, init="random", labels="ICH", epochs=1, checkpoint_dir=None,
                       train_splits=["train", "pool"], out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    with pytest.raises(InputError, match=r"pool\.csv: file not found"):
        load_data(cfg, root)
    header = (splits / "train.csv").read_text().splitlines(keepends=True)[0]
    make_row = lambda i: f"data/store/t/volumes/ser_{i:016x}.npy,ser_{i:016x},pat_{i:016x},{1 - i % 2},0\n"  # noqa: E731
    (splits / "pool.csv").write_text(header + "".join(make_row(i) for i in range(12, 16)))
    data = load_data(cfg, root)
    assert list(data.train["scan_id"]) == [f"ser_{i:016x}" for i in (*range(6), *range(12, 16))]
    assert list(load_data(finetune_cfg(root), root).train["scan_id"]) == [f"ser_{i:016x}" for i in range(6)]
    result = job.run(cfg, JobContext(root=root, tracking=job_ctx.tracking))
    assert result["model"] == "ceiling_random_init"
    table = pd.read_csv(cfg.report_dir / "predictions.csv")
    assert tuple(table.columns) == PREDICTION_COLUMNS and set(table["model"]) == {"ceiling_random_init"}
    assert set(table["split"]) == {"val", "test"}  # the pool is trained on, never scored
    with pytest.raises(ValueError, match="names a split twice"):
        finetune_cfg(root, train_splits=["train", "train"])
    (splits / "pool.csv").write_text(header + make_row(6))  # patient 6 is a val patient
    with pytest.raises(InputError, match=r"in both val\.csv and pool\.csv"):
        load_data(cfg, root)


def test_tuned_file_sits_between_params_yaml_and_set(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("finetune:\n  head_lr: 0.5\n  backbone_lr: 0.25\n  epochs: 7\n")
    tuned = tmp_path / "params/tuned/finetune.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("finetune:\n  head_lr: 0.01\n  backbone_lr: 0.001\n  weight_decay: 0.02\n")
    params, _ = load_params(root=tmp_path, overrides=["finetune.backbone_lr=0.003"])
    ft = params.finetune
    assert (ft.head_lr, ft.backbone_lr, ft.weight_decay, ft.epochs) == (0.01, 0.003, 0.02, 7)
    params, _ = load_params(root=tmp_path, overrides=["finetune.tuned_params=null"])
    assert params.finetune.head_lr == 0.5
    tuned.write_text("finetune:\n  head_lrr: 0.01\n")
    with pytest.raises(ValueError, match="head_lrr"):
        load_params(root=tmp_path)


def test_resnet_baseline_runs_and_its_classifier_dir_reloads(project: Path, job_ctx: JobContext,
                                                             tmp_path: Path) -> None:
    from headct.models.classifier_dir import load_classifier
    from pipelines import finetune as job

    cfg = finetune_cfg(project, arch="resnet10", epochs=1, labels="ICH", checkpoint_dir=None,
                       out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    assert job.run(cfg, JobContext(root=project, tracking=job_ctx.tracking))["model"] == "resnet10"
    classifier, config = load_classifier(cfg.out_dir)
    assert config["arch"] == {"name": "resnet10", "in_chans": 3} and classifier.labels == ["ICH"]


class Killed(Exception):
    pass


def test_a_killed_finetune_resumes_after_its_last_epoch_and_ends_where_an_uninterrupted_one_does(
    project: Path, job_ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct.train.checkpoint as checkpoint
    from pipelines import finetune as job

    ctx = JobContext(root=project, tracking=job_ctx.tracking)

    def cfg(tag: str):
        return finetune_cfg(project, epochs=3, checkpoint_dir=project / f"ckpt-{tag}",
                            out_dir=project / f"models/{tag}", report_dir=project / f"reports/{tag}")

    whole = job.run(cfg("whole"), ctx)
    assert whole["resumed_after_epoch"] is None
    save, calls = checkpoint.save_checkpoint, []

    def save_then_die(*args, **kwargs):  # the process dies right after the first epoch's checkpoint
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise Killed

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        job.run(cfg("killed"), ctx)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    resumed = job.run(cfg("killed"), ctx)
    assert resumed["resumed_after_epoch"] == 1
    history = [json.loads((project / f"reports/{t}/history.json").read_text()) for t in ("whole", "killed")]
    assert [e["val_auroc_mean"] for e in history[0]] == pytest.approx([e["val_auroc_mean"] for e in history[1]],
                                                                       rel=1e-6)
    scores = [pd.read_csv(project / f"reports/{t}/predictions.csv")["score"].to_numpy() for t in ("whole", "killed")]
    assert np.allclose(scores[0], scores[1], rtol=1e-5, atol=1e-7)
    assert list((project / "ckpt-killed").glob("*/complete.pt"))  # finished: never resumed again
    assert not list((project / "ckpt-killed").glob("*/last.pt"))
