"""Calibration of probability scores: Brier score, expected calibration error, reliability curve.

ECE uses `n_bins` equal-width bins over [0, 1] (a score of exactly 1 falls in the last bin):
    ECE = sum_b (n_b / n) * | mean(y in b) - mean(score in b) |,
empty bins contribute nothing. Equal-width bins follow Guo et al. (2017); the value depends on the bin count, so
it is reported with it. Class-balanced probes shift scores towards 0.5 on purpose, so their ECE measures the
price of that reweighting, not a defect of the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headct.eval.metrics import _as_binary

ECE_BINS = 10


def brier_score(y: np.ndarray, score: np.ndarray) -> float:
    """Mean squared difference between the probability score and the 0/1 target (0 is perfect)."""
    y = _as_binary(y)
    return float(np.mean((np.asarray(score, dtype=np.float64) - y) ** 2))


@dataclass
class ReliabilityCurve:
    """Per equal-width bin: mean score, observed positive fraction and count (NaN where a bin is empty)."""

    mean_score: np.ndarray  # (n_bins,)
    observed: np.ndarray  # (n_bins,)
    count: np.ndarray  # (n_bins,) int

    @property
    def ece(self) -> float:
        used = self.count > 0
        weights = self.count[used] / self.count.sum()
        return float((weights * np.abs(self.observed[used] - self.mean_score[used])).sum())


def reliability_curve(y: np.ndarray, score: np.ndarray, n_bins: int = ECE_BINS) -> ReliabilityCurve:
    """Bin the scores (probabilities in [0, 1]) into `n_bins` equal-width bins."""
    y = _as_binary(y).astype(np.float64)
    score = np.asarray(score, dtype=np.float64)
    if score.size and (score.min() < 0 or score.max() > 1):
        raise ValueError("calibration needs probability scores in [0, 1]")
    index = np.minimum((score * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(index, score, minlength=n_bins) / count
        observed = np.bincount(index, y, minlength=n_bins) / count
    return ReliabilityCurve(mean_score, observed, count)


def expected_calibration_error(y: np.ndarray, score: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over `n_bins` equal-width bins (see the module docstring); 0 is perfectly calibrated."""
    return reliability_curve(y, score, n_bins).ece
