"""Linear probe (selection on val only, skips, predictions schema), frozen features, the probe and report jobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.config import JobContext, ProbeConfig, ReportConfig
from headct.errors import InputError
from headct.eval import PREDICTION_COLUMNS
from headct.eval.labels import requested_labels, skip_reason
from headct.eval.probe import LabelData, probe_label
from pipelines import probe as probe_job
from pipelines import report as report_job
from tests.conftest import runs_of
from tests.probe_helpers import TINY_ARCH, WINDOWS, write_splits_and_model, write_volumes


def synthetic(n: int, signal: float, seed: int, d: int = 8) -> LabelData:
    """n scans of 2 each from n/2 patients; feature 0 carries `signal` x target, the rest is noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 < 2).astype(np.int8)  # both scans of a patient share the label
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += signal * y
    return LabelData(
        x,
        y,
        np.array([f"ser_{seed}_{i}" for i in range(n)]),
        np.array([f"pat_{seed}_{i // 2}" for i in range(n)]),
    )


def splits(signal: float) -> dict[str, LabelData]:
    return {
        "train": synthetic(200, signal, 0),
        "val": synthetic(80, signal, 1),
        "test": synthetic(120, signal, 2),
    }


# ------------------------------------------------------------------------------------------------ probe logic
def test_probe_separates_an_informative_label_and_not_a_noise_label() -> None:
    good, _ = probe_label(splits(signal=4.0), "ICH", "pretrained", (0.01, 1.0), n_resamples=200, seed=0)
    noise, _ = probe_label(splits(signal=0.0), "ICH", "random_init", (0.01, 1.0), n_resamples=200, seed=0)
    assert good["auroc"] > 0.95 and good["auroc_low"] > 0.9
    assert 0.3 < noise["auroc"] < 0.7 and noise["auroc_low"] < 0.5 < noise["auroc_high"]


def test_c_and_threshold_are_chosen_on_val_only() -> None:
    data = splits(signal=1.0)
    first, _ = probe_label(data, "ICH", "pretrained", (0.001, 0.01, 0.1, 1.0), n_resamples=50, seed=0)
    flipped = dict(
        data,
        test=LabelData(data["test"].x, 1 - data["test"].y, data["test"].scan_id, data["test"].patient_id),
    )
    second, _ = probe_label(flipped, "ICH", "pretrained", (0.001, 0.01, 0.1, 1.0), n_resamples=50, seed=0)
    assert (first["C"], first["threshold"], first["val_auroc"]) == (
        second["C"],
        second["threshold"],
        second["val_auroc"],
    )
    assert second["auroc"] == pytest.approx(1 - first["auroc"])  # test targets do reach the test metrics


def test_predictions_have_exactly_the_schema_columns() -> None:
    _, rows = probe_label(splits(signal=2.0), "SDH", "pretrained", (1.0,), n_resamples=20, seed=7)
    assert tuple(rows.columns) == PREDICTION_COLUMNS
    assert set(rows["split"]) == {"val", "test"} and len(rows) == 80 + 120
    assert set(rows["mode"]) == {"linear_probe"} and set(rows["k"]) == {""} and set(rows["seed"]) == {7}
    assert rows["threshold"].nunique() == 1


def test_a_label_with_one_test_positive_is_skipped_with_a_reason() -> None:
    data = splits(signal=1.0)
    y = np.zeros_like(data["test"].y)
    y[0] = 1
    data["test"] = LabelData(data["test"].x, y, data["test"].scan_id, data["test"].patient_id)
    assert skip_reason({s: d.y for s, d in data.items()}, 2) == "test has 1 positive(s) (min_positives=2)"
    assert skip_reason({s: d.y for s, d in splits(signal=1.0).items()}, 2) is None


def test_one_min_positives_rule_counts_known_positives_and_negatives_of_any_column_type() -> None:
    column = pd.Series([1, 1, 1, pd.NA, 0], dtype="Int8")  # a split file's column: NA = unknown
    assert skip_reason({"val": column}, 2) == "val has 1 negative(s) (min_positives=2)"
    assert skip_reason({"train": np.array([1.0, np.nan]), "val": column}, 1) == (
        "train has 0 negative(s) (min_positives=1)")
    assert skip_reason({"test": column}, 2, negatives=False) is None  # retrieval's AP needs positives only
    assert skip_reason({"test": column}, 4, negatives=False) == "test has 3 positive(s) (min_positives=4)"
    frames = {"train": pd.DataFrame({"ICH": [1], "SDH": [0]}), "val": pd.DataFrame({"ICH": [0]})}
    assert requested_labels(["ICH"], frames, Path("s")) == ["ICH"]
    with pytest.raises(InputError, match=r"val\.csv: no column for label\(s\) \['SDH'\]"):
        requested_labels(None, frames, Path("s"))  # None: every label column of train


# --------------------------------------------------------------------------------------------- features (ViT)
def test_features_are_batch_independent_and_the_encoder_stays_frozen(tmp_path: Path) -> None:
    import torch

    from headct.eval.features import extract_features
    from headct.models.vit import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(TINY_ARCH)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    paths = write_volumes(tmp_path / "store", 5)
    by2 = extract_features(encoder, paths, WINDOWS, pool="mean", batch_size=2, shape=(16, 16, 16))
    by5 = extract_features(encoder, paths, WINDOWS, pool="mean", batch_size=5)
    cls = extract_features(encoder, paths, WINDOWS, pool="cls", batch_size=5)
    assert by2.shape == (5, 32) and by2.dtype == np.float32
    np.testing.assert_allclose(by2, by5, atol=1e-5)
    assert not np.allclose(by5, cls)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())


def test_a_missing_or_misshapen_volume_is_a_named_error(tmp_path: Path) -> None:
    from headct.eval.features import extract_features
    from headct.models.vit import build_encoder

    encoder = build_encoder(TINY_ARCH)
    paths = write_volumes(tmp_path / "store", 2)
    with pytest.raises(InputError, match=r"ser_0009\.npy: volume file not found"):
        extract_features(encoder, [*paths, tmp_path / "store/volumes/ser_0009.npy"], WINDOWS, batch_size=2)
    with pytest.raises(InputError, match=r"ser_0000\.npy: shape \[16, 16, 16\] differs from the model's"):
        extract_features(encoder, paths, WINDOWS, shape=(16, 16, 8))


# ------------------------------------------------------------------------------------------------- probe job
def test_probe_job_writes_metrics_predictions_and_plots(tmp_path: Path, job_ctx) -> None:
    paths = write_volumes(tmp_path / "store", 36)
    rows = []
    for i, path in enumerate(paths):
        split = "train" if i < 16 else "val" if i < 26 else "test"
        ich = i % 2  # >= 2 positives and negatives everywhere
        edh = "" if i in (1, 17, 30) else int(i in (3, 6, 18, 21, 27))  # one positive (27) in test -> skipped
        rows.append(
            {
                "split": split,
                "img_path": path.relative_to(tmp_path).as_posix(),
                "scan_id": path.stem,
                "patient_id": f"pat_{i // 2:04d}",
                "ICH": ich,
                "EDH": edh,
            }
        )
    write_splits_and_model(tmp_path, rows)

    cfg = ProbeConfig(
        splits=tmp_path,
        model_dir=tmp_path / "model",
        report_dir=tmp_path / "reports/probe",
        bootstrap=50,
        c_grid=(0.1, 1.0),
        batch_size=8,
        device="cpu",
    )
    summary = probe_job.run(cfg, job_ctx)
    metrics = json.loads((cfg.report_dir / "metrics.json").read_text())
    assert set(metrics) == {"pretrained", "random_init", "skipped"} and summary["labels_probed"] == 1
    assert metrics["skipped"] == {"EDH": "test has 1 positive(s) (min_positives=2)"}
    assert {"auroc", "auroc_low", "auroc_high", "ap", "sensitivity", "specificity", "n_pos"} <= set(
        metrics["pretrained"]["ICH"]
    )
    assert metrics["pretrained"]["ICH"]["n_pos"] == 5 and metrics["random_init"]["ICH"]["n_neg"] == 5
    predictions = pd.read_csv(cfg.report_dir / "predictions.csv", keep_default_na=False)
    assert tuple(predictions.columns) == PREDICTION_COLUMNS
    assert set(predictions["model"]) == {"pretrained", "random_init"} and len(predictions) == 2 * (10 + 10)
    test = predictions[(predictions["model"] == "pretrained") & (predictions["split"] == "test")]
    recomputed = (test["score"] >= test["threshold"])[test["target"] == 1].mean()
    assert recomputed == metrics["pretrained"]["ICH"]["sensitivity"], (
        "the CSV must reproduce the reported numbers"
    )
    assert (cfg.report_dir / "roc.png").stat().st_size > 1000
    names = sorted(r.info.run_name for r in runs_of(job_ctx))
    # one job run, named for what it probes, and a child per (model, label)
    assert names == ["pretrained/ICH", "probe mae vit-tiny p8 vs baselines", "random_init/ICH"]  # what the dir holds

    # The model was trained on another preprocessing recipe than the store's: refuse, naming both.
    config = json.loads((tmp_path / "model/config.json").read_text())
    (tmp_path / "model/config.json").write_text(json.dumps({**config, "preprocess": {"version": "v2"}}))
    version = json.loads((tmp_path / "store/preprocess.json").read_text())["version"]
    with pytest.raises(
        InputError, match=rf"preprocess\.json: preprocessing version {version} differs from the model's v2.*"
                          r"or set probe\.allow_preprocess_mismatch: true"
    ):
        probe_job.run(cfg, JobContext(root=tmp_path))
    # ... unless the user says so explicitly: then it probes, with a warning naming both versions.
    allowed = cfg.model_copy(update={"allow_preprocess_mismatch": True, "report_dir": tmp_path / "reports/allowed"})
    assert probe_job.run(allowed, job_ctx)["labels_probed"] == 1


# ------------------------------------------------------------------------------------------------ report job
def test_report_renders_the_table_and_names_a_missing_input(tmp_path: Path, job_ctx) -> None:
    pretrain = tmp_path / "pretrain.json"
    probe = tmp_path / "probe.json"
    pretrain.write_text(json.dumps({"heldout_loss_start": 0.91234, "heldout_loss_end": 0.41, "steps": 10}))
    entry = {"auroc": 0.8123, "auroc_low": 0.7, "auroc_high": 0.9, "n_pos": 12}
    labels = ("ICH", "IPH", "SDH")
    probe.write_text(
        json.dumps(
            {
                "pretrained": {lab: entry for lab in labels},
                "random_init": {lab: dict(entry, auroc=0.55) for lab in labels},
                "hu_histogram": {"ICH": dict(entry, auroc=0.61, auroc_low=None)},
                "skipped": {"EDH": "test has 1 positive(s) (min_positives=2)"},
            }
        )
    )
    fewshot, retrieval = tmp_path / "fewshot.json", tmp_path / "retrieval.json"
    spread = {"auroc_mean": 0.6, "auroc_min": 0.5, "auroc_max": 0.7}
    fewshot.write_text(json.dumps({"mean_over_labels": {"pretrained": {"1": spread, "4": dict(spread, auroc_mean=0.7)},
                                                        "random_init": {"1": spread}}}))
    retrieval.write_text(json.dumps({"pretrained": {"ICH": {"map": 0.42, "chance": 0.3}}, "skipped": {},
                                     "split": "test"}))
    cfg = ReportConfig(probe_metrics=probe, pretrain_metrics=pretrain, report_dir=tmp_path / "reports/report",
                       probe_predictions=None, fewshot_metrics=fewshot, retrieval_metrics=retrieval)
    summary = report_job.run(cfg, job_ctx)
    markdown = (cfg.report_dir / "results.md").read_text()
    assert ("| label | test positives | AUROC pre-trained MAE | AUROC random init | AUROC HU histogram |"
            in markdown)
    assert "| ICH | 12 | 0.812 [0.700, 0.900] | 0.550 [0.700, 0.900] | 0.610 |" in markdown
    assert "| IPH | 12 | 0.812 [0.700, 0.900] | 0.550 [0.700, 0.900] | - |" in markdown
    assert "| pre-trained MAE | 0.600 [0.500, 0.700] | 0.700 [0.500, 0.700] |" in markdown  # few-shot, K=1, 4
    assert "| ICH | 0.300 | 0.420 |" in markdown  # retrieval: chance, then mAP
    assert "EDH: test has 1 positive(s)" in markdown and "0.9123 at start, 0.4100 at end" in markdown
    assert summary["mean_auroc_pretrained"] == pytest.approx(0.8123)
    assert summary["fewshot_auroc_pretrained_k4"] == pytest.approx(0.7)
    assert summary["retrieval_map_pretrained"] == pytest.approx(0.42)
    for name in ("radar.png", "fewshot.png", "retrieval.png"):
        assert (cfg.report_dir / name).stat().st_size > 2000 and f"]({name})" in markdown
    assert not (cfg.report_dir / "calibration.png").exists()  # no predictions given
    assert json.loads((cfg.report_dir / "metrics.json").read_text())["labels_skipped"] == 1
    (run,) = runs_of(job_ctx)
    import mlflow

    artifacts = mlflow.MlflowClient(job_ctx.tracking.uri).list_artifacts(run.info.run_id, "report")
    assert any(a.path.endswith("results.md") for a in artifacts)

    pretrain.unlink()
    with pytest.raises(InputError, match=r"pretrain\.json: file not found"):
        report_job.run(cfg, JobContext(root=tmp_path))
