"""Feature cache (`headct extract`), the external-encoder protocol, and the jobs that read the cache:
probe (from cache), few-shot and retrieval; the CLI commands exist."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.config import ExtractConfig, FewshotConfig, ProbeConfig, RetrievalConfig
from headct.errors import InputError
from headct.eval import PREDICTION_COLUMNS
from headct.eval.feature_cache import FeatureSet, read_cache, write_feature_set, write_index
from tests.conftest import runs_of
from tests.probe_helpers import make_project

EXTERNAL = """
import numpy as np

class MeanStd:
    preprocess = {"shape": [16, 16, 16], "version": "ext-1"}

    def embed(self, hu_volumes):
        flat = hu_volumes.reshape(len(hu_volumes), -1).astype(np.float64)
        return np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)

def make():
    return MeanStd()

class OtherGrid(MeanStd):
    preprocess = {"shape": [16, 16, 8], "version": "ext-2"}

def other_grid():
    return OtherGrid()

def broken():
    return object()

VERSION = None  # set by a test: the store's preprocessing version, as an encoder made for that recipe declares

class SameRecipe(MeanStd):
    @property
    def preprocess(self):
        return {"shape": [16, 16, 16], "version": VERSION}

def same_recipe():
    return SameRecipe()

class Unversioned(MeanStd):
    preprocess = {"shape": [16, 16, 16]}

def unversioned():
    return Unversioned()
"""


@pytest.fixture
def external_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "tiny_external.py").write_text(textwrap.dedent(EXTERNAL))
    monkeypatch.syspath_prepend(str(folder))
    return "tiny_external"


def test_cache_round_trip_and_alignment_with_split_rows(tmp_path: Path) -> None:
    fs = FeatureSet(
        "m1",
        np.array(["a", "b", "c"]),
        np.array(["p1", "p1", "p2"]),
        np.array(["train", "val", "test"]),
        np.arange(6, dtype=np.float32).reshape(3, 2),
        {"kind": "test"},
    )
    write_feature_set(tmp_path, fs)
    write_index(tmp_path, ["m1"])
    back = read_cache(tmp_path)["m1"]
    assert list(back.scan_id) == ["a", "b", "c"] and back.meta == {
        "kind": "test",
        "model": "m1",
        "dim": 2,
        "n": 3,
    }
    np.testing.assert_array_equal(back.embedding, fs.embedding)
    aligned = back.for_frame(pd.DataFrame({"scan_id": ["c", "a"]}), tmp_path / "m1.npz")
    np.testing.assert_array_equal(aligned, [[4, 5], [0, 1]])
    with pytest.raises(InputError, match=r"m1\.npz: scan 'zz' of the split files is not in the cache"):
        back.for_frame(pd.DataFrame({"scan_id": ["zz"]}), tmp_path / "m1.npz")
    with pytest.raises(InputError, match=r"index\.json: model\(s\) \['m2'\] not cached"):
        read_cache(tmp_path, ["m2"])
    with pytest.raises(InputError, match=r"index\.json: file not found"):
        read_cache(tmp_path / "nowhere")


def test_external_protocol_is_checked(external_module: str) -> None:
    from headct.eval.external import checked_embed, load_external

    encoder = load_external(f"{external_module}:make")
    assert checked_embed(encoder, np.zeros((3, 16, 16, 16), np.int16), "x").shape == (3, 2)
    with pytest.raises(InputError, match="lacks `embed` or `preprocess`"):
        load_external(f"{external_module}:broken")
    with pytest.raises(InputError, match="has no attribute 'nope'"):
        load_external(f"{external_module}:nope")
    with pytest.raises(InputError, match="expected 'pkg.module:factory'"):
        load_external(external_module)


def test_extract_then_probe_fewshot_and_retrieval_read_the_cache(
    tmp_path: Path, job_ctx, external_module: str, torch_one_thread
) -> None:
    from pipelines import extract, fewshot, probe, retrieval

    make_project(tmp_path)
    features = tmp_path / "features"
    cfg = ExtractConfig(
        splits=tmp_path,
        model_dir=tmp_path / "model",
        out=features,
        batch_size=8,
        device="cpu",
        external={"meanstd": f"{external_module}:make"},
        allow_preprocess_mismatch=True,  # meanstd declares its own recipe "ext-1"
    )
    summary = extract.run(cfg, job_ctx)
    assert summary == {
        "scans": 48,
        "models": {"pretrained": 32, "random_init": 32, "hu_histogram": 69, "meanstd": 2},
    }
    assert json.loads((features / "index.json").read_text())["models"] == list(summary["models"])
    meta = json.loads((features / "pretrained.json").read_text())
    version = json.loads((tmp_path / "store/preprocess.json").read_text())["version"]
    assert meta["preprocess_version"] == version and len(meta["weights_sha256"]) == 64 and meta["pool"] == "mean"
    cache = read_cache(features)
    assert set(cache["pretrained"].split) == {"train", "val", "test"} and len(cache["meanstd"].scan_id) == 48
    assert not np.allclose(cache["pretrained"].embedding, cache["random_init"].embedding)

    probe_cfg = ProbeConfig(
        splits=tmp_path, features=features, report_dir=tmp_path / "reports/probe", bootstrap=20, c_grid=(1.0,)
    )
    probe.run(probe_cfg, job_ctx)
    metrics = json.loads((probe_cfg.report_dir / "metrics.json").read_text())
    assert set(metrics) == {"pretrained", "random_init", "hu_histogram", "meanstd", "skipped"}
    ich = metrics["hu_histogram"]["ICH"]
    assert {"brier", "ece", "auroc_patient"} <= set(ich) and 0 <= ich["ece"] <= 1
    assert all(
        (probe_cfg.report_dir / n).stat().st_size > 1000 for n in ("roc.png", "pr.png", "reliability.png")
    )

    few_cfg = FewshotConfig(
        features=features,
        splits=tmp_path,
        report_dir=tmp_path / "reports/fewshot",
        models=["pretrained", "hu_histogram"],
        labels=["ICH", "EDH"],
        shots=(1, 2, 8),
        seeds=3,
        c_grid=(1.0,),
    )
    fewshot.run(few_cfg, job_ctx)
    few = json.loads((few_cfg.report_dir / "metrics.json").read_text())
    assert set(few["results"]["pretrained"]["ICH"]) == {"1", "2"}
    assert few["skipped_shots"]["ICH"]["8"].startswith("K=8 needs 8 positive and 8 negative train patients")
    assert "EDH" in few["skipped"]  # val and test have one positive patient each
    entry = few["results"]["hu_histogram"]["ICH"]["2"]
    assert entry["auroc_n_seeds"] == 3
    assert entry["auroc_min"] <= entry["auroc_mean"] <= entry["auroc_max"]
    predictions = pd.read_csv(few_cfg.report_dir / "predictions.csv", keep_default_na=False)
    assert tuple(predictions.columns) == PREDICTION_COLUMNS and set(predictions["mode"]) == {"fewshot"}
    assert set(predictions["split"]) == {"test"} and set(predictions["seed"]) == {0, 1, 2}
    assert set(predictions["k"]) == {1, 2} and len(predictions) == 2 * 2 * 3 * 12  # models x K x seeds x test
    one = predictions[
        (predictions["model"] == "pretrained") & (predictions["k"] == 2) & (predictions["seed"] == 1)
    ]
    from headct.eval.metrics import auroc

    assert auroc(one["target"], one["score"]) == pytest.approx(
        few["results"]["pretrained"]["ICH"]["2"]["auroc_per_seed"][1]
    )
    assert (few_cfg.report_dir / "fewshot.png").stat().st_size > 1000

    ret_cfg = RetrievalConfig(features=features, splits=tmp_path, report_dir=tmp_path / "reports/retrieval")
    retrieval.run(ret_cfg, job_ctx)
    ret = json.loads((ret_cfg.report_dir / "metrics.json").read_text())
    assert ret["meanstd"]["ICH"]["n_queries"] == 6 and ret["meanstd"]["ICH"]["chance"] == pytest.approx(0.5)
    assert "EDH" in ret["skipped"] and (ret_cfg.report_dir / "retrieval.png").stat().st_size > 1000

    runs = runs_of(job_ctx)
    names = [r.info.run_name for r in runs]
    assert {"extract", "probe", "fewshot", "retrieval"} <= {r.data.tags["headct.job"] for r in runs
                                                         if "headct.job" in r.data.tags}
    assert {"pretrained/K=2", "hu_histogram/K=1"} <= set(names)
    assert sum(n.endswith(("K=1", "K=2")) for n in names) == 4  # one child per (model, K)

    # New weights in the model directory make the cache stale: readers refuse it rather than report old numbers.
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    for job, job_cfg in ((probe, probe_cfg), (fewshot, few_cfg), (retrieval, ret_cfg)):
        with pytest.raises(InputError, match=r"pretrained\.json: .*re-run `headct extract`"):
            job.run(job_cfg, job_ctx)


def test_extract_names_a_volume_off_the_external_grid_or_changed_after_ingest(
    tmp_path: Path, job_ctx, external_module: str
) -> None:
    from pipelines import extract

    make_project(tmp_path)
    cfg = ExtractConfig(
        splits=tmp_path,
        model_dir=None,
        hu_histogram=False,
        out=tmp_path / "f",
        external={"other": f"{external_module}:other_grid"},
        allow_preprocess_mismatch=True,  # the point here is the grid, checked per volume
    )
    off_grid = r"ser_0000\.npy: shape \[16, 16, 16\] differs from the model's .*\[16, 16, 8\]"
    with pytest.raises(InputError, match=off_grid):
        extract.run(cfg, job_ctx)
    np.save(tmp_path / "store/volumes/ser_0003.npy", np.zeros((16, 16, 16), np.int16))  # not what ingest wrote
    cfg = cfg.model_copy(update={"external": {"meanstd": f"{external_module}:make"}})
    with pytest.raises(InputError, match=r"ser_0003\.npy: SHA-256 .* differs from the manifest's"):
        extract.run(cfg, job_ctx)
    assert not (tmp_path / "f/index.json").exists()


def test_an_external_encoder_must_declare_the_store_recipe_unless_explicitly_allowed(
    tmp_path: Path, job_ctx, external_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from pipelines import extract

    make_project(tmp_path)
    version = json.loads((tmp_path / "store/preprocess.json").read_text())["version"]
    cfg = ExtractConfig(splits=tmp_path, model_dir=None, hu_histogram=False, out=tmp_path / "f")
    for factory, problem in (
        ("make", rf"preprocessing version {version} differs from the model's ext-1 \(external encoder "
                 rf"{external_module}:make\)"),
        ("unversioned", rf"external encoder {external_module}:unversioned: no preprocess version recorded"),
    ):
        refused = cfg.model_copy(update={"external": {"ext": f"{external_module}:{factory}"}})
        with pytest.raises(InputError, match=problem + r".*or set extract\.allow_preprocess_mismatch: true"):
            extract.run(refused, job_ctx)
        assert not (tmp_path / "f/index.json").exists()
        allowed = refused.model_copy(update={"allow_preprocess_mismatch": True})
        assert extract.run(allowed, job_ctx)["models"] == {"ext": 2}
        (tmp_path / "f/index.json").unlink()
    monkeypatch.setattr(importlib.import_module(external_module), "VERSION", version)
    same = cfg.model_copy(update={"external": {"ext": f"{external_module}:same_recipe"}})
    assert extract.run(same, job_ctx)["models"] == {"ext": 2}
    assert json.loads((tmp_path / "f/ext.json").read_text())["preprocess_version"] == version


@pytest.mark.parametrize("command", ["extract", "fewshot", "retrieval"])
def test_cli_commands_exist(command: str) -> None:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--set" in result.output
