"""Binary-classification metrics with patient-level bootstrap confidence intervals.

Point estimates come from scikit-learn. The bootstrap resamples *patients* with replacement and keeps all of a
drawn patient's scans, because scans of one patient are not independent (CQ500 labels are even per patient):
resampling scans would give intervals that are too narrow. A resample is represented by integer weights per
scan (how often its patient was drawn), so every resample is computed at once with numpy instead of a Python
loop over resamples; the weighted formulas equal scikit-learn's with `sample_weight`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS: tuple[str, ...] = ("auroc", "ap", "sensitivity", "specificity")


def _as_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("targets must be a 1-D array of 0/1 (drop unknown labels first)")
    return y.astype(np.int8)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(_as_binary(y), score))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(_as_binary(y), score))


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 on (y, score); rule: positive when score >= threshold.

    Chosen on validation data only; the ROC curve's leading +inf (nothing positive) is never returned.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(_as_binary(y), score, drop_intermediate=False)
    j = np.round(tpr - fpr, 12)[1:]  # rounded so exact ties go to the higher threshold, not to float noise
    return float(thresholds[1:][int(np.argmax(j))])


def sensitivity_specificity(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    y = _as_binary(y)
    pred = np.asarray(score) >= threshold
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


def patient_level(
    y: np.ndarray, score: np.ndarray, patient_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Study/patient-level aggregation: max over a patient's series of the target and of the score.

    Where labels are per patient (CQ500 reads), a patient is positive when any series is, and the model's
    patient score is its most suspicious series. Returns (y (P,), score (P,), patient ids (P,), sorted).
    """
    ids, index = np.unique(np.asarray(patient_id), return_inverse=True)
    y_p = np.zeros(len(ids), dtype=np.int8)
    s_p = np.full(len(ids), -np.inf)
    np.maximum.at(y_p, index, _as_binary(y))
    np.maximum.at(s_p, index, np.asarray(score, dtype=np.float64))
    return y_p, s_p, ids


# --------------------------------------------------------------------------------- weighted (vectorised)
def weighted_auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per row of weights. y, score: (n,); w: (B, n) non-negative -> (B,). Ties count one half."""
    order = np.argsort(score, kind="stable")
    s, y, w = score[order], y[order], w[:, order]
    n = len(s)
    new_group = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_group)
    group = np.cumsum(new_group) - 1
    first, end = starts[group], np.r_[starts[1:], n][group]
    w_pos, w_neg = w * (y == 1), w * (y == 0)
    cum_neg = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w_neg, axis=1)], axis=1)  # (B, n + 1)
    below = cum_neg[:, first]
    tied = cum_neg[:, end] - below
    return (w_pos * (below + 0.5 * tied)).sum(axis=1) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def weighted_average_precision(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (sum over thresholds of recall step x precision) per row of weights -> (B,)."""
    order = np.argsort(-score, kind="stable")
    s, y, w = score[order], y[order], w[:, order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(w * (y == 1), axis=1)[:, ends]
    fp = np.cumsum(w * (y == 0), axis=1)[:, ends]
    d_tp = np.diff(tp, axis=1, prepend=0.0)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    return (d_tp * precision).sum(axis=1) / tp[:, -1]


def _weighted_rates(
    y: np.ndarray, score: np.ndarray, threshold: float, w: np.ndarray
) -> tuple[np.ndarray, ...]:
    pred = score >= threshold
    w_pos, w_neg = w * (y == 1), w * (y == 0)
    return (w_pos * pred).sum(axis=1) / w_pos.sum(axis=1), (w_neg * ~pred).sum(axis=1) / w_neg.sum(axis=1)


def bootstrap_weights(
    group_index: np.ndarray, n_groups: int, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_resamples, n_scans) weights: each resample draws `n_groups` patients with replacement; a scan's weight
    is the number of times its patient was drawn, so a patient's scans always move together."""
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    flat = (draws + n_groups * np.arange(n_resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    return counts[:, group_index].astype(np.float64)


class UsableDraws:
    """Iterate chunks of patient-bootstrap weights (R, n_scans) in which both classes occur, until `n_resamples`
    usable ones were drawn or `max_draw_factor * n_resamples` draws in all; `n_valid` / `n_redrawn` count them.

    Draws come from `rng` lazily, one chunk per step, so a caller may draw from the same generator between chunks
    (the few-shot comparison draws its seeds there). Chunks bound memory to about 32 MB per array.
    """

    def __init__(self, y: np.ndarray, groups: np.ndarray, n_resamples: int, rng: np.random.Generator,
                 max_draw_factor: int = 10) -> None:
        self.y, self.n_resamples, self.rng, self.max_draw_factor = y, n_resamples, rng, max_draw_factor
        _, self.group_index = np.unique(np.asarray(groups), return_inverse=True)
        self.n_valid = self.n_redrawn = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        y, n_resamples = self.y, self.n_resamples
        n_groups = int(self.group_index.max()) + 1
        chunk = max(1, min(n_resamples, 4_000_000 // max(len(y), 1)))
        while self.n_valid < n_resamples and self.n_valid + self.n_redrawn < self.max_draw_factor * n_resamples:
            w = bootstrap_weights(self.group_index, n_groups, min(chunk, n_resamples - self.n_valid), self.rng)
            usable = ((w * (y == 1)).sum(axis=1) > 0) & ((w * (y == 0)).sum(axis=1) > 0)
            self.n_redrawn += int((~usable).sum())
            w = w[usable]
            self.n_valid += len(w)
            if len(w):
                yield w


def percentile_interval(samples: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile 95% interval of bootstrap replicates; (None, None) under 10 of them."""
    if len(samples) < 10:
        return None, None
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class BootstrapResult:
    """Percentile 95% intervals per metric; `None` bounds when fewer than 10 usable resamples."""

    intervals: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    n_valid: int = 0
    n_redrawn: int = 0  # resamples lacking positives or negatives, drawn again
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def patient_bootstrap(
    y: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    max_draw_factor: int = 10,
) -> BootstrapResult:
    """Patient-level bootstrap of AUROC, AP, sensitivity and specificity (at `threshold`).

    Args:
        y: (n,) 0/1 targets; score: (n,) scores; groups: (n,) patient id per scan.
        n_resamples: usable resamples wanted; a resample without both classes is redrawn, up to
            `max_draw_factor * n_resamples` draws in all (the result reports how many were redrawn).
    """
    y, score = _as_binary(y), np.asarray(score, dtype=np.float64)
    draws = UsableDraws(y, groups, n_resamples, np.random.default_rng(seed), max_draw_factor)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for w in draws:
        sens, spec = _weighted_rates(y, score, threshold, w)
        parts["auroc"].append(weighted_auroc(y, score, w))
        parts["ap"].append(weighted_average_precision(y, score, w))
        parts["sensitivity"].append(sens)
        parts["specificity"].append(spec)
    result = BootstrapResult(n_valid=draws.n_valid, n_redrawn=draws.n_redrawn)
    for name, chunks in parts.items():
        result.samples[name] = np.concatenate(chunks) if chunks else np.zeros(0)
        result.intervals[name] = percentile_interval(result.samples[name])
    return result


def evaluate_binary(
    y: np.ndarray, score: np.ndarray, groups: np.ndarray, threshold: float, n_resamples: int, seed: int
) -> dict[str, Any]:
    """Flat, JSON-able test metrics: point estimates, `<metric>_low/_high` 95% CI bounds, counts."""
    y = _as_binary(y)
    sens, spec = sensitivity_specificity(y, score, threshold)
    point = {
        "auroc": auroc(y, score),
        "ap": average_precision(y, score),
        "sensitivity": sens,
        "specificity": spec,
    }
    boot = patient_bootstrap(y, score, groups, threshold, n_resamples, seed)
    out: dict[str, Any] = {}
    if np.all((np.asarray(score) >= 0) & (np.asarray(score) <= 1)):  # probabilities: calibration applies
        from headct.eval.calibration import ECE_BINS, brier_score, expected_calibration_error

        out.update(brier=brier_score(y, score), ece=expected_calibration_error(y, score), ece_bins=ECE_BINS)
    for name in METRICS:
        out[name] = point[name]
        out[f"{name}_low"], out[f"{name}_high"] = boot.intervals[name]
    out.update(
        threshold=float(threshold),
        n_pos=int((y == 1).sum()),
        n_neg=int((y == 0).sum()),
        n_patients=int(len(np.unique(groups))),
        bootstrap_valid=boot.n_valid,
        bootstrap_redrawn=boot.n_redrawn,
    )
    return out


def label_aurocs(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """AUROC per label of (n, L) targets (NaN unknown) and probabilities, over its known targets; labels lacking
    a class are left out."""
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if (y == 1).any() and (y == 0).any():
            out[label] = auroc(y.astype(np.int8), probs[known, j])
    return out
