"""Attention maps, rollout and occlusion sensitivity, and the `headct explain` job (tiny shapes; CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headct.eval.attention import attention_rollout, cls_attention, occlusion_sensitivity
from headct.models.vit import build_encoder

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def encoder(depth: int = 2, registers: int = 0):
    torch.manual_seed(0)
    return build_encoder({"name": "tiny", "img_size": 32, "patch_size": 8, "in_chans": 3, "depth": depth,
                          "num_registers": registers}).eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_attention_maps_have_the_volume_shape_and_sum_to_one(registers: int) -> None:
    enc = encoder(registers=registers)
    x = torch.rand(2, 3, 32, 32, 32)
    for maps in (cls_attention(enc, x), attention_rollout(enc, x)):
        assert maps.shape == (2, 32, 32, 32) and maps.dtype == np.float32
        assert (maps >= 0).all()
        assert np.allclose(maps.sum(axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_rollout_of_one_block_without_residual_is_the_cls_attention() -> None:
    enc = encoder(depth=1)
    x = torch.rand(1, 3, 32, 32, 32)
    assert np.allclose(attention_rollout(enc, x, residual=0.0), cls_attention(enc, x), atol=1e-6)
    # With the residual path the deeper rollout differs from the last block alone.
    deep = encoder(depth=3)
    assert not np.allclose(attention_rollout(deep, x), cls_attention(deep, x), rtol=1e-3, atol=0)


def test_occlusion_finds_the_cube_the_score_depends_on() -> None:
    hu = torch.full((32, 32, 32), 30.0)
    hu[16:24, 8:16, 0:8] = 70.0  # a "bleed" filling one 8^3 cube

    def score(v: torch.Tensor) -> torch.Tensor:  # probability-like: how much of the cube is bright
        return (v[:, 16:24, 8:16, 0:8] > 50).float().mean(dim=(1, 2, 3))

    heat = occlusion_sensitivity(score, hu, patch=8, baseline_hu=30.0, batch_size=5)
    assert heat.shape == (32, 32, 32) and np.isclose(heat.sum(), 1.0, atol=1e-4)
    cubes = heat.reshape(4, 8, 4, 8, 4, 8).sum(axis=(1, 3, 5))
    assert cubes.argmax() == np.ravel_multi_index((2, 1, 0), (4, 4, 4))  # the cube the score depends on
    assert cubes[2, 1, 0] > 0.4  # the largest share (trilinear upsampling spills some into the neighbours)
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert 16 <= peak[0] < 24 and 8 <= peak[1] < 16 and peak[2] < 8
    flat = occlusion_sensitivity(lambda v: torch.zeros(len(v)), hu, patch=8)
    assert np.allclose(flat, flat.mean(), rtol=1e-3)  # no drop anywhere -> uniform, documented
    # Air is never occluded (filling it with tissue would paint a new object): a scorer that reacts to any
    # tissue in the air half leaves that half empty on the map.
    half = hu.clone()
    half[:, :, 16:] = -1000.0
    air_sensitive = occlusion_sensitivity(lambda v: (v[:, :, :, 16:] > 0).float().mean(dim=(1, 2, 3)) - 1, half, 8)
    assert air_sensitive[:, :, 20:].sum() < 1e-6 and np.isclose(air_sensitive.sum(), 1.0, atol=1e-4)


def test_explain_job_writes_montages_and_names_scans_by_pseudonym(job_ctx) -> None:
    from headct.config import ExplainConfig
    from headct.models.model_dir import save_model_dir
    from pipelines.explain import run
    from tests.pretrain_helpers import SIZE, make_project

    root = make_project(job_ctx.root / "proj")
    enc = build_encoder({"name": "tiny", "img_size": SIZE, "patch_size": 16, "in_chans": 3, "depth": 2})
    spec = json.loads((root / "data/store/t/preprocess.json").read_text())
    windows = [{"name": "brain", "level": 40, "width": 80}, {"name": "subdural", "level": 80, "width": 200},
               {"name": "bone", "level": 600, "width": 2800}]
    save_model_dir(root / "models/mae", enc, {"preprocess": spec, "windows": windows, "method": "mae",
                                              "provenance": {}})
    ctx = job_ctx.model_copy(update={"root": root})
    cfg = ExplainConfig(splits=root / "data/splits/t", model_dir=root / "models/mae",
                        report_dir=root / "reports/explain", slices=3, methods=("cls", "rollout", "occlusion"),
                        device="cpu")
    out = run(cfg, ctx)
    assert out["labels_explained"] == 1  # ICH has positives in val
    for name in ("attention_cls.png", "attention_rollout.png"):
        assert (root / "reports/explain" / name).stat().st_size > 2000
    assert not (root / "reports/explain/occlusion.png").exists()  # needs a classifier: skipped with a note
    summary = json.loads((root / "reports/explain/explain.json").read_text())
    scan = summary["scans"]["ICH"]["scan_id"]
    val = (root / "data/splits/t/val.csv").read_text()
    assert scan.startswith("ser_") and f"{scan},pat_" in val and f"{scan}," in val
    assert all(len(v) == 3 for v in summary["scans"]["ICH"]["slices"].values())

    # With a fine-tuned classifier: the most confident positive is shown, and occlusion runs through it.
    from headct.models.classifier_dir import save_classifier
    from headct.models.heads import Classifier

    torch.manual_seed(1)
    classifier = Classifier(enc, "mean", 1).eval()
    save_classifier(root / "models/classifier", classifier, {"labels": ["ICH"], "thresholds": {"ICH": 0.5},
                                                            "windows": windows, "preprocess": spec})
    out = run(cfg.model_copy(update={"classifier_dir": root / "models/classifier"}), ctx)
    assert (root / "reports/explain/occlusion.png").stat().st_size > 2000
    summary = json.loads((root / "reports/explain/explain.json").read_text())
    assert summary["methods"] == ["cls", "rollout", "occlusion"]
    assert len(summary["scans"]["ICH"]["slices"]["occlusion"]) == 3
