"""Per patient beside per series (FM-HCT's count) from the probe job to the report: several series per patient,
and the one-line case of one series per patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from headct.config import ProbeConfig, ReportConfig
from headct.eval.feature_cache import FeatureSet, write_feature_set, write_index
from pipelines import probe as probe_job
from pipelines import report as report_job

# Test patients of the several-series case: (ICH label, the 1-D feature of each of its series). A positive patient
# may have a series that looks normal (e.g. a bone-kernel copy), which costs per series but not per patient.
SEVERAL = {
    "pos_a": (1, [2.0, -2.0]),
    "pos_b": (1, [1.5, 0.2]),
    "pos_c": (1, [1.0]),
    "neg_a": (0, [0.5, -1.0]),
    "neg_b": (0, [0.0, 0.1, -0.5]),
    "neg_c": (0, [-1.5]),
    "neg_d": (0, [1.2, -1.8]),
}
ONE_EACH = {f"{p}_{i}": (y, [x]) for i, (p, (y, x)) in
            enumerate([("pos", (1, 1.4)), ("pos", (1, 0.3)), ("pos", (1, -0.2)), ("neg", (0, 0.6)),
                       ("neg", (0, -0.4)), ("neg", (0, -1.1)), ("neg", (0, 0.0))])}


def write_project(root: Path, test: dict[str, tuple[int, list[float]]]) -> Path:
    """Split files and a feature cache of two models with one feature each: train and val one series per patient,
    cleanly separated; test as given. `pretrained` carries the given feature; `random_init` adds noise to it.
    A logistic probe on one feature scores monotonically in it, so the test AUROCs follow from `test` alone."""
    rows = []
    for split, n in (("train", 20), ("val", 8)):
        for i in range(n):
            y = i % 2
            rows.append((split, f"{split}_{i:02d}", y, (1.0 if y else -1.0) + 0.05 * i))
    for patient, (y, xs) in test.items():
        rows += [("test", patient, y, x) for x in xs]
    frame = pd.DataFrame(rows, columns=["split", "patient_id", "ICH", "x"])
    frame["scan_id"] = [f"ser_{i:04d}" for i in range(len(frame))]
    frame["img_path"] = "store/volumes/" + frame["scan_id"] + ".npy"  # not read: the features are cached
    for split, part in frame.groupby("split"):
        part[["img_path", "scan_id", "patient_id", "ICH"]].to_csv(root / f"{split}.csv", index=False)
    features = root / "features"
    features.mkdir()
    x = frame["x"].to_numpy(np.float32)[:, None]
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    for model, embedding in (("pretrained", x), ("random_init", x + noise)):
        write_feature_set(features, FeatureSet(model, frame["scan_id"].to_numpy(), frame["patient_id"].to_numpy(),
                                               frame["split"].to_numpy(), embedding))
    write_index(features, ["pretrained", "random_init"])
    return features


def probe_and_report(root: Path, test: dict[str, tuple[int, list[float]]], job_ctx) -> tuple[dict, str, pd.DataFrame]:
    probe_cfg = ProbeConfig(splits=root, features=write_project(root, test), report_dir=root / "reports/probe",
                            bootstrap=200, c_grid=(1.0,), seed=3)
    probe_job.run(probe_cfg, job_ctx)
    report_cfg = ReportConfig(probe_metrics=probe_cfg.report_dir / "metrics.json", pretrain_metrics=None,
                              probe_predictions=probe_cfg.report_dir / "predictions.csv",
                              report_dir=root / "reports/report")
    report_job.run(report_cfg, job_ctx)
    predictions = pd.read_csv(probe_cfg.report_dir / "predictions.csv")
    return (json.loads((probe_cfg.report_dir / "metrics.json").read_text()),
            (report_cfg.report_dir / "results.md").read_text(), predictions[predictions["split"] == "test"])


def cell(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def test_several_series_per_patient_give_per_patient_and_per_series_side_by_side(tmp_path: Path, job_ctx) -> None:
    metrics, markdown, test = probe_and_report(tmp_path, SEVERAL, job_ctx)
    # Independently of headct: per series every series is a sample with its patient's label; per patient the
    # maximum over its series. By construction 29/40 against 11/12.
    y = [y for y, xs in SEVERAL.values() for _ in xs]
    x = [x for _, xs in SEVERAL.values() for x in xs]
    per_series = roc_auc_score(y, x)
    per_patient = roc_auc_score([y for y, _ in SEVERAL.values()], [max(xs) for _, xs in SEVERAL.values()])
    assert (per_series, per_patient) == (pytest.approx(29 / 40), pytest.approx(11 / 12))

    ich = metrics["pretrained"]["ICH"]
    assert ich["auroc"] == pytest.approx(per_series) and ich["auroc_patient"] == pytest.approx(per_patient)
    assert (ich["n_series"], ich["n_series_pos"], ich["n_patients"], ich["n_patients_pos"]) == (13, 5, 7, 3)
    assert ich["auroc_patient_low"] <= ich["auroc_patient"] <= ich["auroc_patient_high"]
    assert ich["auroc_patient_low"] < ich["auroc_patient_high"]
    # The noisy model too: both figures recomputed from its predictions with scikit-learn.
    noisy = test[test["model"] == "random_init"]
    by_patient = noisy.groupby("patient_id")[["target", "score"]].max()
    ri = metrics["random_init"]["ICH"]
    assert ri["auroc"] == pytest.approx(roc_auc_score(noisy["target"], noisy["score"]))
    assert ri["auroc_patient"] == pytest.approx(roc_auc_score(by_patient["target"], by_patient["score"]))

    assert "## Per patient and per series (FM-HCT counted every series)" in markdown
    row = (f"| ICH | pre-trained | {cell(ich['auroc_patient'], ich['auroc_patient_low'], ich['auroc_patient_high'])} | "
           f"{cell(ich['auroc'], ich['auroc_low'], ich['auroc_high'])} | 7 / 13 | 3 / 5 |")
    assert row in markdown
    assert f"| ICH | random init | {ri['auroc_patient']:.3f} [" in markdown
    assert "narrows CIs falsely" in markdown and "Per patient = per series here" not in markdown


def test_one_series_per_patient_gives_one_line(tmp_path: Path, job_ctx) -> None:
    metrics, markdown, _ = probe_and_report(tmp_path, ONE_EACH, job_ctx)
    ich = metrics["pretrained"]["ICH"]
    expected = roc_auc_score([y for y, _ in ONE_EACH.values()], [xs[0] for _, xs in ONE_EACH.values()])
    assert ich["auroc"] == pytest.approx(expected) and ich["auroc_patient"] == pytest.approx(expected)
    assert ich["n_series"] == ich["n_patients"] == 7
    # One series per patient: the patient-level bootstrap is the per-scan one, resample for resample.
    assert (ich["auroc_patient_low"], ich["auroc_patient_high"]) == (ich["auroc_low"], ich["auroc_high"])
    assert "Per patient = per series here: every test patient has one series" in markdown
    assert "## Per patient and per series" not in markdown
