"""Heads, the classifier directory, the fine-tuning loop and the `headct finetune` job on a tiny store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headct.config import FinetuneConfig, JobContext, load_params
from headct.data.volumes import class_balanced_weights
from headct.errors import ConfigError, InputError
from headct.eval import PREDICTION_COLUMNS
from headct.models.heads import AttentivePoolHead, Classifier, LinearHead
from headct.models.vit import build_encoder
from headct.train.finetune import masked_bce, param_groups, pos_weights
from tests.conftest import runs_of
from tests.finetune_helpers import SIZE, TINY_ARCH, WINDOWS, finetune_cfg, make_labelled_project

pytestmark = pytest.mark.usefixtures("torch_one_thread")

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
    attentive = AttentivePoolHead(32, 3, num_heads=4)
    assert attentive(tokens[:, 1:]).shape == (4, 3) and attentive.attention.num_heads == 4
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide the token width 32; allowed: "
                                         r"\[1, 2, 4, 8, 16, 32\]"):
        AttentivePoolHead(32, 3, num_heads=3)  # never lowered quietly to a divisor
    encoder = build_encoder(TINY_ARCH)
    x = torch.rand(2, 3, SIZE, SIZE, SIZE)
    for pool, kind in (("cls", "linear"), ("mean", "linear"), ("attentive", "attentive")):
        model = Classifier(encoder, pool, 5)
        assert model(x).shape == (2, 5) and model.head_type == kind


@pytest.mark.parametrize("arch", ["vit", "resnet10"])
def test_the_job_refuses_attention_heads_that_do_not_divide_the_width_before_training(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    from typer.testing import CliRunner

    import cli

    heads, width = (3, 32) if arch == "vit" else (7, 512)  # the tiny encoder's width is 32, a ResNet's 512
    (tmp_path / "params.yaml").write_text(
        f"tracking:\n  uri: sqlite:///{tmp_path}/mlflow.db\nfinetune:\n  splits: {project}/data/splits/t\n"
        f"  model_dir: {project}/models/mae\n  arch: {arch}\n  pool: attentive\n  attention_heads: {heads}\n"
        f"  checkpoint_dir: {tmp_path}/ckpt\n  out_dir: {tmp_path}/clf\n  report_dir: {tmp_path}/rep\n"
        "  min_positives: 1\n  batch_size: 2\n  tuned_params: null\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["finetune"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    allowed = [h for h in range(1, 65) if width % h == 0]
    assert f"finetune.attention_heads={heads} does not divide the encoder width {width}" in message
    assert f"allowed: {allowed}" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ckpt").exists()  # nothing started


def test_a_model_made_for_another_recipe_is_refused_before_training_unless_allowed(
    project: Path, job_ctx: JobContext, tmp_path: Path
) -> None:
    import shutil

    from pipelines import finetune as job

    model = tmp_path / "imported"
    shutil.copytree(project / "models/mae", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "preprocess": {"shape": [SIZE] * 3}}))  # no version
    cfg = finetune_cfg(project, model_dir=model, labels="ICH", epochs=1, checkpoint_dir=tmp_path / "ckpt",
                       out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    ctx = JobContext(root=project, tracking=job_ctx.tracking)
    with pytest.raises(InputError, match=rf"{model / 'config.json'}: no preprocess version recorded.*"
                                         r"or set finetune\.allow_preprocess_mismatch: true"):
        job.run(cfg, ctx)
    assert not (tmp_path / "ckpt").exists() and not runs_of(job_ctx)  # refused before any training or run
    allowed = cfg.model_copy(update={"allow_preprocess_mismatch": True})
    assert job.run(allowed, ctx)["labels"] == ["ICH"]
    assert (tmp_path / "clf/model.safetensors").is_file()


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
    assert str(project) not in json.dumps(config["provenance"])  # project-relative paths only (issue 12)
    test = pd.read_csv(cfg.splits / "test.csv")
    hu = np.stack([np.load(project / p) for p in test["img_path"]])
    probs = predict_proba(classifier, hu)
    for j, label in enumerate(config["labels"]):
        rows = table[(table["split"] == "test") & (table["label"] == label)]
        np.testing.assert_allclose(probs[:, j], rows["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    runs = runs_of(ctx)
    assert len(runs) == 1 and "val_auroc_mean" in runs[0].data.metrics
    assert runs[0].info.run_name == "finetune ICH,SDH vit pretrained mean-pool"
    assert (project / "ckpt").is_dir()
    card = (cfg.out_dir / "README.md").read_text()  # the model card, from the same facts as metrics.json
    assert f"- test scans: {test_rows['scan_id'].nunique()}" in card and "- labels: ICH, SDH" in card
    for label, m in metrics["labels"].items():
        assert f"- test AUROC {label} (95% CI): {m['auroc']:.3f} [{m['auroc_low']:.3f}" in card
    assert str(project) not in card

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


def test_random_init_single_label_run_with_freezing_and_balanced_sampling(
    project: Path, job_ctx: JobContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backbone does not move in its frozen epoch and does in the next; the training draws are the
    class-balanced sampler's (train SDH is 4 positives to 2 negatives), not the uniform epoch order."""
    import headct.train.checkpoint as checkpoint
    from headct.data.volumes import LabelledVolumeDataset, WeightedStepSampler
    from headct.train.finetune import SAMPLER_STREAM
    from pipelines import finetune as job

    cfg = finetune_cfg(project, init="random", labels="SDH", pool="attentive", epochs=2,
                       freeze_backbone_epochs=1, balanced_sampling=True, checkpoint_dir=tmp_path / "ckpt",
                       out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    backbones, drawn = [], []
    save = checkpoint.save_checkpoint

    def save_and_record(path, model, optimizer, step, config, extra=None):  # after every epoch
        backbones.append({n: p.detach().clone() for n, p in model.backbone.named_parameters()})
        save(path, model, optimizer, step, config, extra)

    get = LabelledVolumeDataset.__getitem__

    def get_and_record(self, index):
        drawn.append(int(index))
        return get(self, index)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_and_record)
    monkeypatch.setattr(LabelledVolumeDataset, "__getitem__", get_and_record)
    result = job.run(cfg, JobContext(root=project, tracking=job_ctx.tracking))
    monkeypatch.undo()
    assert result["model"] == "random_init" and result["labels"] == ["SDH"]
    table = pd.read_csv(cfg.report_dir / "predictions.csv")
    assert set(table["model"]) == {"random_init"} and set(table["label"]) == {"SDH"}

    torch.manual_seed(cfg.seed)  # the job's random init of the backbone (before the head is built)
    initial = dict(build_encoder(TINY_ARCH).named_parameters())
    frozen, released = backbones
    assert all(torch.equal(frozen[n], initial[n]) for n in initial), "the frozen epoch moved the backbone"
    assert any(not torch.equal(released[n], frozen[n]) for n in frozen), "the released epoch left it alone"
    history = json.loads((cfg.report_dir / "history.json").read_text())
    assert [e["backbone_frozen"] for e in history] == [True, False]

    targets = pd.read_csv(project / "data/splits/t/train.csv")["SDH"].to_numpy(np.float32)[:, None]
    assert targets[:, 0].tolist() == [1, 1, 0, 0, 1, 1]
    balanced = class_balanced_weights(targets)
    np.testing.assert_allclose(balanced, [1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 8, 1 / 8])  # each class half the draws
    steps = 3  # 6 scans / batch 2, per epoch
    expected = [i for batch in WeightedStepSampler(balanced, 2, cfg.seed, 0, 2 * steps, SAMPLER_STREAM) for i in batch]
    assert drawn == expected


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
    (tmp_path / "params.yaml").write_text("finetune:\n  epochs: 7\n")
    tuned = tmp_path / "params/tuned/finetune.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("finetune:\n  head_lr: 0.01\n  backbone_lr: 0.001\n  weight_decay: 0.02\n")
    params, _ = load_params(root=tmp_path, overrides=["finetune.backbone_lr=0.003"])
    ft = params.finetune
    assert (ft.head_lr, ft.backbone_lr, ft.weight_decay, ft.epochs) == (0.01, 0.003, 0.02, 7)
    tuned.write_text("finetune:\n  head_lrr: 0.01\n")
    with pytest.raises(ValueError, match="head_lrr"):
        load_params(root=tmp_path)


def test_params_file_may_not_set_a_tuned_key_while_a_tuned_file_is_named(tmp_path: Path) -> None:
    """`dvc exp run -S finetune.head_lr=...` writes params.yaml, which the tuned file would override: refused
    (exit 2 from the CLI), present tuned file or not yet; tuned_params: null makes params.yaml's value count."""
    (tmp_path / "params.yaml").write_text("finetune:\n  head_lr: 0.5\n  epochs: 7\n")
    with pytest.raises(ConfigError, match=r"finetune\.head_lr set here.*not written yet.*tuned_params=null"):
        load_params(root=tmp_path)
    tuned = tmp_path / "params/tuned/finetune.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("finetune:\n  head_lr: 0.01\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"finetune\.epochs, finetune\.head_lr set here.*present"):
        load_params(root=tmp_path)
    params, _ = load_params(root=tmp_path, overrides=["finetune.tuned_params=null"])
    assert (params.finetune.head_lr, params.finetune.epochs) == (0.5, 7)
    (tmp_path / "params.yaml").write_text("finetune:\n  head_lr: 0.5\n  tuned_params: null\n")
    assert load_params(root=tmp_path)[0].finetune.head_lr == 0.5
    (tmp_path / "params.yaml").write_text("finetune:\n  batch_size: 4\n")
    params, _ = load_params(root=tmp_path, overrides=["finetune.head_lr=0.2"])  # --set wins over the tuned file
    assert (params.finetune.head_lr, params.finetune.epochs, params.finetune.batch_size) == (0.2, 3, 4)


@pytest.mark.parametrize(("arch", "recorded"), [
    ("resnet10", {"name": "resnet10", "in_chans": 3}),
    ("cnn", {"name": "cnn", "in_chans": 3, "channels": [8, 16, 32, 64]}),
])
def test_cnn_baselines_run_and_their_classifier_dirs_reload(project: Path, job_ctx: JobContext, tmp_path: Path,
                                                            arch: str, recorded: dict) -> None:
    from headct.models.classifier_dir import load_classifier
    from pipelines import finetune as job

    cfg = finetune_cfg(project, arch=arch, init="random", epochs=1, labels="ICH", checkpoint_dir=None,
                       out_dir=tmp_path / "clf", report_dir=tmp_path / "rep")
    assert job.run(cfg, JobContext(root=project, tracking=job_ctx.tracking))["model"] == arch
    classifier, config = load_classifier(cfg.out_dir)
    assert config["arch"] == recorded and classifier.labels == ["ICH"]
    assert classifier.eval()(torch.rand(1, 3, SIZE, SIZE, SIZE)).shape == (1, 1)


def test_small_cnn_reads_a_focal_spot_through_its_global_max_token() -> None:
    from headct.models.cnn import SmallCNN3D

    torch.manual_seed(0)
    backbone = SmallCNN3D(in_chans=3).eval()
    tokens = backbone.forward_features(torch.rand(2, 3, 32, 32, 32))
    assert tokens.shape == (2, 1 + 2 * 2 * 2, 64)  # 32^3 halved by four units: 2^3 positions, D = 64
    assert torch.equal(tokens[:, 0], tokens[:, 1:].amax(dim=1))
    # a bright 4^3 spot anywhere changes the max token, wherever it sits (what a focal finding needs)
    base = torch.zeros(1, 3, 32, 32, 32)
    spots = []
    for corner in ((2, 2, 2), (24, 24, 24)):
        x = base.clone()
        x[..., corner[0]:corner[0] + 4, corner[1]:corner[1] + 4, corner[2]:corner[2] + 4] = 1.0
        spots.append(backbone.forward_features(x)[0, 0])
    plain = backbone.forward_features(base)[0, 0]
    assert all((s - plain).abs().max() > 1e-3 for s in spots)
    with pytest.raises(ValueError, match="channels must be"):
        SmallCNN3D(channels=())


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


def test_layer_decay_gives_each_vit_block_its_own_backbone_lr_and_both_vit_knobs_are_refused_for_a_resnet() -> None:
    import pytest
    from pydantic import ValidationError

    from headct.config.finetune import FinetuneConfig
    from headct.models.heads import Classifier
    from headct.models.vit import build_encoder
    from headct.train.finetune import param_groups
    from headct.train.finetune_data import layer_decay_groups

    enc = build_encoder({"name": "tiny", "img_size": 16, "patch_size": 8, "in_chans": 3, "depth": 2})
    clf = Classifier(enc, "mean", 3)
    groups = param_groups(clf, 1e-4, 1e-3, 0.05, layer_decay_groups(0.05, 0.5)(clf))
    by_param = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    lr = {name: by_param[id(p)] for name, p in clf.named_parameters()}
    # depth 2, decay 0.5: block 1 -> 1e-4 * 0.5, block 0 -> 1e-4 * 0.25, embeddings 1e-4 * 0.125, head 1e-3
    assert lr["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(5e-5)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(2.5e-5)
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(1.25e-5)
    assert all(v == pytest.approx(1e-3) for k, v in lr.items() if k.startswith("head."))
    with pytest.raises(ValidationError, match="ViT backbones only"):
        FinetuneConfig(arch="resnet18", init="random", layer_decay=0.75)
    with pytest.raises(ValidationError, match="ViT backbones only"):
        FinetuneConfig(arch="resnet18", init="random", drop_path_rate=0.1)
