"""Calibration (Brier, ECE), patient-level aggregation, subgroup AUROC, and bootstrap CI coverage."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from headct.eval.calibration import brier_score, expected_calibration_error, reliability_curve
from headct.eval.metrics import patient_bootstrap, patient_level
from headct.eval.subgroups import subgroup_auroc, subgroup_table, thickness_bucket


def test_brier_matches_scikit_learn_on_fixed_data() -> None:
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = rng.random(300)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(50_000)
    y = (rng.random(50_000) < p).astype(int)  # P(y=1 | p) = p: perfectly calibrated
    assert expected_calibration_error(y, p) < 0.01
    overconfident = np.where(p > 0.5, 1.0, 0.0) * 0.98 + 0.01
    assert expected_calibration_error(y, overconfident) > 0.2
    curve = reliability_curve(y, p, n_bins=10)
    assert curve.count.sum() == 50_000 and np.allclose(curve.observed, curve.mean_score, atol=0.02)


def test_ece_by_hand_and_scores_outside_unit_interval_are_refused() -> None:
    # bins [0, .5) and [.5, 1]: |0.5 - 0.2| * 2/4 + |1.0 - 0.9| * 2/4 = 0.2
    assert expected_calibration_error([0, 1, 1, 1], [0.2, 0.2, 0.9, 0.9], n_bins=2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [-0.5, 2.0])


def test_patient_level_takes_the_max_over_series() -> None:
    y, score, ids = patient_level(
        np.array([0, 1, 0, 0]), np.array([0.9, 0.2, 0.1, 0.3]), np.array(["b", "b", "a", "a"])
    )
    assert list(ids) == ["a", "b"] and list(y) == [0, 1] and list(score) == [0.3, 0.9]


def test_subgroups_skip_small_groups_with_a_reason_and_bucket_thickness() -> None:
    manifest = pd.DataFrame(
        {
            "scan_id": [f"s{i}" for i in range(40)],
            "manufacturer": ["GE"] * 30 + ["Siemens"] * 10,
            "kernel": [""] * 40,
            "slice_thickness_mm": [0.625] * 20 + [5.0] * 20,
        }
    )
    groups = subgroup_table(manifest).drop(columns="scan_id")
    assert "kernel" not in subgroup_auroc(np.zeros(40), np.zeros(40), groups[["kernel"]])  # all unknown
    y = np.tile([0, 1], 20)
    score = y + np.random.default_rng(0).normal(0, 0.1, 40)
    out = subgroup_auroc(y, score, groups, min_count=6)
    assert out["manufacturer"]["GE"]["auroc"] == pytest.approx(1.0)
    assert out["manufacturer"]["Siemens"]["skipped"] == "5 positive(s), 5 negative(s) (min 6 of each)"
    assert set(out["slice_thickness"]) == {"thin <1.5mm", "thick >=3.5mm"}
    assert thickness_bucket(pd.Series([1.0, 2.0, None])).iloc[:2].tolist() == [
        "thin <1.5mm",
        "medium 1.5-3.5mm",
    ]


def test_patient_bootstrap_ci_covers_the_true_auroc_at_about_the_nominal_rate() -> None:
    """Binormal scores (positives shifted by d), 2 scans per patient sharing the label: true AUROC = Phi(d/sqrt2)."""
    d, n_patients, sims = 1.0, 60, 200
    truth = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt(2))
    rng = np.random.default_rng(0)
    covered = 0
    for sim in range(sims):
        y_patient = np.repeat([0, 1], n_patients // 2)
        y = np.repeat(y_patient, 2)
        score = rng.normal(size=len(y)) + d * y
        groups = np.repeat(np.arange(n_patients), 2)
        low, high = patient_bootstrap(y, score, groups, 0.5, n_resamples=200, seed=sim).intervals["auroc"]
        covered += low <= truth <= high
    assert 0.88 <= covered / sims <= 0.99
