"""Masked restoration of the small CNN (pretrain.method mim) and its residual read-out (extract.pools residual)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from headct.config import ExtractConfig, PretrainConfig
from headct.errors import InputError
from headct.models.cnn import SmallCNN3D
from headct.models.restoration import RESIDUAL_DIM, MaskedRestoration
from tests.pretrain_helpers import SIZE, ctx_for, make_cfg, make_project

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model(seed: int = 0) -> MaskedRestoration:
    torch.manual_seed(seed)
    return MaskedRestoration(SmallCNN3D(3), 0.6).eval()


def test_the_residual_is_input_minus_restoration_where_hidden_and_averaged_over_the_passes() -> None:
    model = _model()
    with torch.no_grad():  # a head that restores every voxel as 0: the residual is then the input itself
        model.head.pred.weight.zero_()
        model.head.pred.bias.zero_()
    x = torch.rand(2, 3, SIZE, SIZE, SIZE)
    residual, seen = model.residual_map(x)
    assert 0.5 < seen.float().mean() < 1.0  # four masks at 60 % leave some cubes never hidden
    assert torch.allclose(residual[:, :, seen[0]], x[:, :, seen[0]], atol=1e-6)
    assert (residual[:, :, ~seen[0]] == 0).all()


def test_residual_features_depend_on_the_volume_alone_not_on_its_batch() -> None:
    model = _model()
    a, b = torch.rand(1, 3, SIZE, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE, SIZE)
    alone = model.residual_features(a)
    together = model.residual_features(torch.cat([a, b]))
    assert alone.shape == (1, RESIDUAL_DIM)
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_a_grid_the_cnn_cannot_stride_is_refused_naming_the_step() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        _model()(torch.rand(1, 3, 24, 32, 32))


def test_mim_belongs_to_the_small_cnn_and_the_vit_methods_to_a_vit() -> None:
    with pytest.raises(ValidationError, match="does not fit"):
        PretrainConfig(method="mim", arch="tiny")
    with pytest.raises(ValidationError, match="does not fit"):
        PretrainConfig(method="mae", arch="cnn")


@pytest.fixture(scope="module")
def mim_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from pipelines.pretrain import run

    root = make_project(tmp_path_factory.mktemp("mim") / "proj")
    out = run(make_cfg(root, method="mim", arch="cnn", mask_ratio=0.6, samples=32, lr=2e-3), ctx_for(root))
    return root, out


def _copy_with_a_test_split(src: Path, tmp_path: Path) -> Path:
    """A copy of the mim project whose test.csv is readable: the fixture's is not, so val's second patient becomes
    test."""
    root = tmp_path / "proj"
    shutil.copytree(src, root)
    splits = root / "data/splits/t"
    header, *rows = (splits / "val.csv").read_text().splitlines(keepends=True)
    (splits / "val.csv").write_text(header + "".join(rows[:2]))
    (splits / "test.csv").write_text(header + "".join(rows[2:]))
    return root


def test_the_mim_job_keeps_the_restoration_head_and_learns(mim_project: tuple[Path, dict]) -> None:
    import mlflow

    from headct.models.model_dir import RESTORATION_HEAD, load_model_dir, load_restoration

    root, out = mim_project
    assert out["heldout_loss_end"] < out["heldout_loss_start"]
    encoder, config = load_model_dir(root / "models/mae")
    assert isinstance(encoder, SmallCNN3D) and config["method"] == "mim" and config["mask_ratio"] == 0.6
    assert (root / "models/mae" / RESTORATION_HEAD).is_file()
    model = load_restoration(root / "models/mae", encoder, config)
    assert model.residual_features(torch.rand(1, 3, SIZE, SIZE, SIZE)).shape == (1, RESIDUAL_DIM)
    assert (root / "reports/pretrain/pretext.png").stat().st_size > 1000
    client = mlflow.MlflowClient(tracking_uri=ctx_for(root).tracking.uri)
    experiment = client.get_experiment_by_name(ctx_for(root).tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.`headct.job` = 'pretrain'")
    assert run.info.run_name == f"pretrain mim cnn {SIZE}^3"
    assert "- method: MIM" in (root / "models/mae/README.md").read_text()
    import headct  # the model card's promise: the public loader embeds with it

    volumes = np.full((2, SIZE, SIZE, SIZE), -1000, np.int16)
    volumes[:, 8:24, 8:24, 8:24] = 35
    assert headct.load_encoder(root / "models/mae").embed(volumes).shape == (2, encoder.embed_dim)


def test_extract_reads_the_residual_for_the_pretrained_model_and_its_twin(
    mim_project: tuple[Path, dict], tmp_path: Path
) -> None:
    from headct.eval.feature_cache import read_cache
    from pipelines.extract import run

    root = _copy_with_a_test_split(mim_project[0], tmp_path)
    splits = root / "data/splits/t"
    cfg = ExtractConfig(splits=splits, model_dir=root / "models/mae", out=root / "features",
                        pools=("mean", "residual"), random_init_seeds=(0, 5), hu_histogram=False, batch_size=3)
    run(cfg, ctx_for(root))
    index = json.loads((root / "features/index.json").read_text())
    for arm in ("pretrained", "random_init", "random_init.s5"):
        assert f"{arm}.residual.b-1" in index["models"]
    cache = read_cache(root / "features")
    trained, twin = cache["pretrained.residual.b-1"], cache["random_init.residual.b-1"]
    assert trained.embedding.shape == (len(trained.scan_id), RESIDUAL_DIM) == (12, RESIDUAL_DIM)
    assert np.isfinite(trained.embedding).all()
    assert not np.allclose(trained.embedding, twin.embedding)  # the trained head restores differently
    assert cache["pretrained"].embedding.shape[1] == SmallCNN3D(3).embed_dim  # "mean" of the last map
    assert trained.meta["restoration_head_sha256"] == twin.meta["restoration_head_sha256"]  # provenance of the dir


def test_the_residual_pool_on_a_vit_model_directory_is_refused(tmp_path: Path) -> None:
    from pipelines.extract import run
    from pipelines.pretrain import run as pretrain

    root = make_project(tmp_path / "proj")
    pretrain(make_cfg(root, samples=4), ctx_for(root))
    (root / "data/splits/t/test.csv").write_text("img_path,scan_id,patient_id,ICH\n")
    cfg = ExtractConfig(splits=root / "data/splits/t", model_dir=root / "models/mae", out=root / "features",
                        pools=("residual",), hu_histogram=False)
    with pytest.raises(InputError, match="masked-restoration"):
        run(cfg, ctx_for(root))


def test_fine_tuning_starts_the_small_cnn_from_the_mim_model_directory(mim_project: tuple[Path, dict],
                                                                       tmp_path: Path) -> None:
    from headct.config import FinetuneConfig
    from headct.models.model_dir import load_model_dir
    from headct.train.finetune_data import build_classifier, load_data, model_name

    root, _ = mim_project
    cfg = FinetuneConfig(splits=root / "data/splits/t", model_dir=root / "models/mae", arch="cnn", init="pretrained",
                         tuned_params=None, min_positives=1, labels=["ICH"])
    data = load_data(cfg, root)
    classifier, windows, preprocess = build_classifier(cfg, data, root)
    encoder, config = load_model_dir(root / "models/mae")
    state = classifier.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())  # the pre-trained weights
    assert windows == config["windows"] and model_name(cfg) == "pretrained"
    scratch = build_classifier(cfg.model_copy(update={"init": "random"}), data, root)[0].backbone.state_dict()
    assert not torch.equal(scratch["units.0.conv.unit0.conv.weight"], state["units.0.conv.unit0.conv.weight"])


def test_fine_tuning_the_cnn_from_a_vit_model_directory_is_refused(tmp_path: Path) -> None:
    from headct.config import FinetuneConfig
    from headct.train.finetune_data import build_classifier, load_data
    from pipelines.pretrain import run as pretrain

    root = make_project(tmp_path / "proj")
    pretrain(make_cfg(root, samples=4), ctx_for(root))
    cfg = FinetuneConfig(splits=root / "data/splits/t", model_dir=root / "models/mae", arch="cnn", init="pretrained",
                         tuned_params=None, min_positives=1, labels=["ICH"])
    with pytest.raises(InputError, match="small-CNN model directory"):
        build_classifier(cfg, load_data(cfg, root), root)


def test_explain_shows_a_mim_model_s_restoration_residual_instead_of_attention(
    mim_project: tuple[Path, dict], tmp_path: Path
) -> None:
    from headct.config import ExplainConfig
    from pipelines.explain import run

    src, _ = mim_project
    root = tmp_path / "proj"
    shutil.copytree(src, root)
    cfg = ExplainConfig(splits=root / "data/splits/t", model_dir=root / "models/mae",
                        report_dir=root / "reports/explain", slices=3, methods=("cls", "residual"), device="cpu")
    out = run(cfg, ctx_for(root))
    assert out["labels_explained"] == 1
    assert (root / "reports/explain/restoration_residual.png").stat().st_size > 2000
    assert not (root / "reports/explain/attention_cls.png").exists()  # a CNN has no attention: skipped, said so
    summary = json.loads((root / "reports/explain/explain.json").read_text())
    assert summary["methods"] == ["residual"] and len(summary["scans"]["ICH"]["slices"]["residual"]) == 3
    heat = _model().residual_heat(torch.rand(2, 3, SIZE, SIZE, SIZE))
    assert heat.shape == (2, SIZE, SIZE, SIZE) and (heat >= 0).all()
    assert torch.allclose(heat.flatten(1).sum(1), torch.ones(2))


def test_a_mim_directory_without_its_mask_ratio_is_refused_not_defaulted(mim_project: tuple[Path, dict],
                                                                         tmp_path: Path) -> None:
    from headct.models.model_dir import load_model_dir, load_restoration

    model_dir = tmp_path / "model"
    shutil.copytree(mim_project[0] / "models/mae", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["mask_ratio"]
    (model_dir / "config.json").write_text(json.dumps(config))
    encoder, config = load_model_dir(model_dir)
    with pytest.raises(InputError, match="mask_ratio = None"):
        load_restoration(model_dir, encoder, config)


def test_fine_tuning_through_the_residual_read_out_starts_from_the_mim_directory_and_reloads_strictly(
    mim_project: tuple[Path, dict], tmp_path: Path
) -> None:
    """finetune.pool residual: the pre-trained arm holds the directory's encoder and restoration head, its twin a
    seeded random init of the same; training moves the encoder (the loss reaches it through the read-out), and the
    written classifier directory reloads strictly to the same predictions."""
    from headct.config import FinetuneConfig
    from headct.models.classifier_dir import load_classifier, predict_proba
    from headct.models.model_dir import load_model_dir, load_restoration
    from headct.train.finetune_data import build_classifier, load_data, model_name
    from pipelines import finetune as job

    root = _copy_with_a_test_split(mim_project[0], tmp_path)
    cfg = FinetuneConfig(splits=root / "data/splits/t", model_dir=root / "models/mae", arch="cnn", init="pretrained",
                         pool="residual", tuned_params=None, min_positives=1, labels=["ICH"], epochs=1, batch_size=2,
                         checkpoint_dir=None, register_as=None, out_dir=root / "clf", report_dir=root / "rep",
                         bootstrap=10, device="cpu")
    data = load_data(cfg, root)
    classifier, windows, _ = build_classifier(cfg, data, root)
    encoder, config = load_model_dir(root / "models/mae")
    restoration = load_restoration(root / "models/mae", encoder, config)
    state = classifier.backbone.restoration.state_dict()
    assert all(torch.equal(state[k], v) for k, v in restoration.state_dict().items())
    assert classifier.backbone.embed_dim == RESIDUAL_DIM and model_name(cfg) == "pretrained"
    twin_cfg = cfg.model_copy(update={"init": "random", "seed": 3})
    twin = build_classifier(twin_cfg, data, root)[0].backbone.restoration.state_dict()
    assert model_name(twin_cfg) == "random_init"
    assert not torch.equal(twin["head.pred.weight"], state["head.pred.weight"])
    assert torch.equal(twin["head.pred.weight"],
                       build_classifier(twin_cfg, data, root)[0].backbone.restoration.state_dict()["head.pred.weight"])

    out = job.run(cfg, ctx_for(root))
    assert out["model"] == "pretrained"
    reloaded, saved = load_classifier(cfg.out_dir)
    assert saved["pool"] == "residual" and saved["arch"]["readout"] == "residual" and saved["arch"]["mask_ratio"] == 0.6
    trained = reloaded.backbone.restoration.encoder.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in encoder.state_dict().items()
               if v.is_floating_point())  # the encoder was fine-tuned, not frozen
    volumes = np.full((2, SIZE, SIZE, SIZE), -1000, np.int16)
    volumes[:, 8:24, 8:24, 8:24] = 35
    volumes[1, 12:16, 12:16, 12:16] = 70  # a hyperdense spot
    first = predict_proba(reloaded, volumes)
    assert first.shape == (2, 1) and np.isfinite(first).all()
    assert np.array_equal(first, predict_proba(reloaded, volumes))  # fixed read-out masks: deterministic


def test_the_residual_pool_fits_only_the_small_cnn_and_only_a_mim_directory(mim_project: tuple[Path, dict],
                                                                            tmp_path: Path) -> None:
    from headct.config import FinetuneConfig
    from headct.models.heads import Classifier
    from headct.train.finetune_data import build_classifier, load_data
    from pipelines.pretrain import run as pretrain

    with pytest.raises(ValidationError, match="pool residual reads the small CNN"):
        FinetuneConfig(arch="vit", pool="residual")
    with pytest.raises(ValueError, match="pool 'residual'"):
        Classifier(SmallCNN3D(3), "residual", 1)
    root = make_project(tmp_path / "proj")
    pretrain(make_cfg(root, samples=4), ctx_for(root))  # a ViT MAE directory
    cfg = FinetuneConfig(splits=root / "data/splits/t", model_dir=root / "models/mae", arch="cnn", init="random",
                         pool="residual", tuned_params=None, min_positives=1, labels=["ICH"])
    with pytest.raises(InputError, match="finetune.pool=residual reads a masked-restoration model directory"):
        build_classifier(cfg, load_data(cfg, root), root)
