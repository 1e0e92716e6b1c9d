"""Metrics: scikit-learn agreement, patient-level bootstrap behaviour, thresholds chosen on val."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from headct.eval.metrics import (
    bootstrap_weights,
    evaluate_binary,
    patient_bootstrap,
    sensitivity_specificity,
    weighted_auroc,
    weighted_average_precision,
    youden_threshold,
)


def scored(n_patients: int, scans_per_patient: int, effect: float, seed: int):
    """Patient-level labels; every scan of a patient shares the patient's score (perfectly correlated scans)."""
    rng = np.random.default_rng(seed)
    y_patient = rng.integers(0, 2, n_patients)
    s_patient = rng.normal(size=n_patients) + effect * y_patient
    groups = np.repeat(np.arange(n_patients), scans_per_patient)
    return y_patient[groups], s_patient[groups], groups


def test_weighted_metrics_equal_sklearn_with_sample_weight_including_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # many ties
    w = rng.integers(0, 4, (6, 200)).astype(float)
    np.testing.assert_allclose(weighted_auroc(y, s, w), [roc_auc_score(y, s, sample_weight=r) for r in w])
    np.testing.assert_allclose(
        weighted_average_precision(y, s, w), [average_precision_score(y, s, sample_weight=r) for r in w]
    )


def test_ci_contains_point_estimate_and_narrows_with_more_patients() -> None:
    widths = []
    for n in (40, 400):
        y, s, g = scored(n, 2, effect=1.0, seed=1)
        m = evaluate_binary(y, s, g, threshold=0.5, n_resamples=500, seed=0)
        assert m["auroc_low"] <= m["auroc"] <= m["auroc_high"]
        assert m["ap_low"] <= m["ap"] <= m["ap_high"]
        widths.append(m["auroc_high"] - m["auroc_low"])
    assert widths[1] < widths[0] / 2


def test_separable_label_scores_one_and_random_label_about_half() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 2000)
    g = np.arange(2000)
    perfect = evaluate_binary(y, y + rng.random(2000) * 0.5, g, threshold=0.75, n_resamples=200, seed=0)
    assert perfect["auroc"] == 1.0 and perfect["auroc_low"] == 1.0 and perfect["ap"] == 1.0
    assert perfect["sensitivity"] == 1.0 and perfect["specificity"] == 1.0
    noise = evaluate_binary(y, rng.random(2000), g, threshold=0.5, n_resamples=200, seed=0)
    assert 0.45 < noise["auroc"] < 0.55 and noise["auroc_low"] < 0.5 < noise["auroc_high"]


def test_a_patient_with_many_scans_moves_as_one_unit() -> None:
    groups = np.array([0] * 10 + [1, 2, 3])
    w = bootstrap_weights(np.unique(groups, return_inverse=True)[1], 4, 300, np.random.default_rng(0))
    assert (w[:, :10] == w[:, :1]).all(), "all scans of patient 0 share one weight per resample"
    assert set(np.unique(w[:, 0])) <= {0, 1, 2, 3, 4} and w.sum(axis=1).min() >= 4


def test_patient_resampling_is_wider_than_scan_resampling_for_correlated_scans() -> None:
    # 30 patients x 10 identical-score scans: treating scans as independent (groups = scans) overstates the
    # sample size about tenfold, so its AUROC spread must be clearly smaller than the patient-level one.
    y, s, g = scored(30, 10, effect=1.0, seed=3)
    by_patient = patient_bootstrap(y, s, g, 0.5, n_resamples=1000, seed=0).samples["auroc"]
    by_scan = patient_bootstrap(y, s, np.arange(len(y)), 0.5, n_resamples=1000, seed=0).samples["auroc"]
    assert by_patient.std() > 2 * by_scan.std()


def test_resamples_without_both_classes_are_redrawn_and_counted() -> None:
    y = np.array([1] + [0] * 19)
    s = np.linspace(0, 1, 20)[::-1]
    result = patient_bootstrap(y, s, np.arange(20), 0.5, n_resamples=300, seed=0)
    assert result.n_valid == 300 and result.n_redrawn > 50  # P(positive not drawn) = 0.95**20 ~ 0.36
    assert np.isfinite(result.samples["auroc"]).all()


def test_youden_threshold_and_rates() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9])
    t = youden_threshold(y, s)
    assert t == 0.5  # J = 1 - 1/4 beats 0.7's J = 2/3 - 0
    assert sensitivity_specificity(y, s, t) == (1.0, 0.75)
    assert youden_threshold(np.array([0, 1]), np.array([0.3, 0.3])) == 0.3  # never the ROC curve's +inf
