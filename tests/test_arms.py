"""Evaluation arms: feature-cache variants (pool x block x random-init seed) from one forward pass, and the
per-arm choice of a variant on val in probe and few-shot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.config import ExtractConfig, FewshotConfig, ProbeConfig
from headct.errors import InputError
from headct.eval.feature_cache import arms_of, read_cache, variant_of
from tests.probe_helpers import TINY_ARCH, WINDOWS, make_project, write_volumes

ARCH2 = {**TINY_ARCH, "depth": 2, "num_registers": 1}  # two blocks, and a register to drop


def _two_block_model(root: Path) -> None:
    """Replace the project's model directory by a seeded 2-block encoder (same preprocessing)."""
    import torch

    from headct.models.model_dir import read_config, save_model_dir
    from headct.models.vit import build_encoder

    config = read_config(root / "model")
    torch.manual_seed(3)
    save_model_dir(root / "model", build_encoder(ARCH2), {k: config[k] for k in ("windows", "preprocess",
                                                                                  "method", "provenance")})


def test_variants_come_from_one_pass_and_the_default_equals_forward_pooled(tmp_path: Path) -> None:
    import torch

    from headct.data.windows import hu_to_windows
    from headct.eval.features import extract_features, extract_variants
    from headct.models.vit import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ARCH2)
    paths = write_volumes(tmp_path / "store", 5)
    got = extract_variants(encoder, paths, WINDOWS, pools=("mean", "cls", "max", "meanmax"), blocks=(-1, 0),
                           batch_size=2)
    for pool in ("mean", "cls"):  # the default variant is the old embedding, bit for bit
        assert np.array_equal(got[(pool, -1)], extract_features(encoder, paths, WINDOWS, pool=pool, batch_size=2))
    assert got[("meanmax", 0)].shape == (5, 64) and got[("max", -1)].shape == (5, 32)
    np.testing.assert_array_equal(got[("meanmax", 0)], np.concatenate([got[("mean", 0)], got[("max", 0)]], 1))
    assert not np.allclose(got[("mean", 0)], got[("mean", -1)])
    hu = torch.from_numpy(np.stack([np.load(p) for p in paths]))
    with torch.inference_mode():
        (tokens,) = encoder.forward_intermediates(hu_to_windows(hu, WINDOWS), indices=[0], norm=True,
                                                  output_fmt="NLC", intermediates_only=True)
    np.testing.assert_allclose(got[("max", 0)], tokens.amax(dim=1).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"block\(s\) \[2\] out of range for this 2-block encoder"):
        extract_variants(encoder, paths, WINDOWS, pools=("mean",), blocks=(2,))
    with pytest.raises(ValueError, match="name the same block twice"):
        extract_variants(encoder, paths, WINDOWS, pools=("mean",), blocks=(1, -1))


def test_extract_writes_one_model_per_variant_and_keeps_the_default_as_it_was(tmp_path: Path, job_ctx,
                                                                               torch_one_thread) -> None:
    from pipelines import extract

    make_project(tmp_path)
    _two_block_model(tmp_path)
    plain = ExtractConfig(splits=tmp_path, model_dir=tmp_path / "model", out=tmp_path / "plain", batch_size=16,
                          device="cpu")
    extract.run(plain, job_ctx)
    cfg = plain.model_copy(update={"out": tmp_path / "variants", "pools": ("mean", "max"), "blocks": (-1, -2),
                                   "random_init_seeds": (0, 5)})
    summary = extract.run(cfg, job_ctx)
    arms = ("pretrained", "random_init", "random_init.s5")
    expected = [f"{a}{v}" for a in arms for v in ("", ".mean.b-2", ".max.b-1", ".max.b-2")] + ["hu_histogram"]
    assert list(summary["models"]) == expected
    assert json.loads((cfg.out / "index.json").read_text())["models"] == expected
    for name in ("pretrained", "random_init", "hu_histogram"):  # the default variants' files are unchanged
        assert (cfg.out / f"{name}.json").read_bytes() == (plain.out / f"{name}.json").read_bytes()
        assert (cfg.out / f"{name}.npz").read_bytes() == (plain.out / f"{name}.npz").read_bytes()
    meta = json.loads((cfg.out / "random_init.s5.max.b-2.json").read_text())
    assert (meta["arm"], meta["pool"], meta["block"], meta["init_seed"], meta["kind"]) == (
        "random_init.s5", "max", -2, 5, "random_init")
    cache = read_cache(cfg.out, root=tmp_path)
    assert variant_of(cache["pretrained"]).__dict__ == {"model": "pretrained", "arm": "pretrained", "pool": "mean",
                                                        "block": -1, "init_seed": None}
    assert variant_of(cache["random_init"]).init_seed == 0 and variant_of(cache["hu_histogram"]).pool is None
    assert arms_of(cache)["random_init.s5"] == [f"random_init.s5{v}" for v in ("", ".mean.b-2", ".max.b-1",
                                                                                ".max.b-2")]
    assert not np.allclose(cache["random_init"].embedding, cache["random_init.s5"].embedding)

    with pytest.raises(InputError, match=r"config\.json: extract\.blocks \[-3\] must be distinct blocks of this "
                                         r"2-block encoder"):
        extract.run(cfg.model_copy(update={"blocks": (-3,)}), job_ctx)
    with pytest.raises(ValueError, match="extract.random_init_seeds must not repeat"):
        ExtractConfig(random_init_seeds=(1, 1))
    with pytest.raises(ValueError, match="reserved for the built-in models"):
        ExtractConfig(external={"pretrained.x": "a:b"})


@pytest.fixture
def variant_cache(tmp_path: Path, job_ctx, torch_one_thread) -> Path:
    from pipelines import extract

    make_project(tmp_path)
    _two_block_model(tmp_path)
    cfg = ExtractConfig(splits=tmp_path, model_dir=tmp_path / "model", out=tmp_path / "features", batch_size=16,
                        device="cpu", pools=("mean", "max"), blocks=(-1, 0), random_init_seeds=(0, 1))
    extract.run(cfg, job_ctx)
    return cfg.out


def test_probe_chooses_each_arms_variant_on_val_and_reports_it_under_the_arm(
    tmp_path: Path, job_ctx, variant_cache: Path
) -> None:
    from pipelines import probe

    common = {"splits": tmp_path, "features": variant_cache, "bootstrap": 20, "c_grid": (0.1, 1.0)}
    every = ProbeConfig(**common, report_dir=tmp_path / "every")
    chosen = ProbeConfig(**common, report_dir=tmp_path / "chosen", select_by=["ICH"])
    probe.run(every, job_ctx)
    probe.run(chosen, job_ctx)
    all_variants = json.loads((every.report_dir / "metrics.json").read_text())
    selected = json.loads((chosen.report_dir / "metrics.json").read_text())
    arms = ["pretrained", "random_init", "random_init.s1", "hu_histogram"]
    assert set(selected) == {*arms, "skipped", "selection", "diagnostic"}
    for arm in arms:
        record = selected["selection"]["arms"][arm]
        val = {v: per_label["ICH"] for v, per_label in record["val_auroc"].items()}
        assert record["chosen"] == max(val, key=val.get)  # the best val AUROC, the first on ties
        assert val[record["chosen"]] == all_variants[record["chosen"]]["ICH"]["val_auroc"]
        # The arm's test result is exactly the chosen variant's: same probe, same bootstrap.
        assert selected[arm]["ICH"]["auroc"] == all_variants[record["chosen"]]["ICH"]["auroc"]
        for variant, per_label in selected["diagnostic"]["test_auroc"][arm].items():
            assert per_label["ICH"] == pytest.approx(all_variants[variant]["ICH"]["auroc"])
    assert len(selected["selection"]["arms"]["pretrained"]["val_auroc"]) == 4
    predictions = pd.read_csv(chosen.report_dir / "predictions.csv")
    assert list(dict.fromkeys(predictions["model"])) == arms
    assert "not a result" in selected["diagnostic"]["note"]

    with pytest.raises(ValueError, match="probe.select_by chooses among cached variants"):
        ProbeConfig(select_by=["ICH"])
    with pytest.raises(InputError, match=r"no label of probe.select_by \['EDH'\] can choose"):
        probe.run(chosen.model_copy(update={"select_by": ["EDH"]}), job_ctx)  # EDH: one train/val positive


def test_fewshot_chooses_per_arm_at_each_k_on_val(tmp_path: Path, job_ctx, variant_cache: Path) -> None:
    from pipelines import fewshot

    common = {"features": variant_cache, "splits": tmp_path, "labels": ["ICH"], "shots": (1, 2), "seeds": 2,
              "c_grid": (1.0,)}
    chosen = FewshotConfig(**common, report_dir=tmp_path / "chosen", select_by=["ICH"])
    fewshot.run(chosen, job_ctx)
    metrics = json.loads((chosen.report_dir / "metrics.json").read_text())
    assert metrics["models"] == ["pretrained", "random_init", "random_init.s1", "hu_histogram"]
    record = metrics["selection"]["arms"]["pretrained"]
    assert set(record) == {"1", "2"} and record["2"]["labels"] == ["ICH"]
    for k in ("1", "2"):
        means = record[k]["val_auroc_mean"]
        assert record[k]["chosen"] == max(means, key=means.get)
    variant = record["2"]["chosen"]
    alone = FewshotConfig(**common, report_dir=tmp_path / "alone", models=[variant])
    fewshot.run(alone, job_ctx)
    direct = json.loads((alone.report_dir / "metrics.json").read_text())
    assert (metrics["results"]["pretrained"]["ICH"]["2"]["auroc_per_seed"]
            == direct["results"][variant]["ICH"]["2"]["auroc_per_seed"])
    predictions = pd.read_csv(chosen.report_dir / "predictions.csv")
    assert set(predictions["model"]) == set(metrics["models"])
