"""Linear probe of one label on frozen features: standardise on train, logistic regression per C, C and the
decision threshold chosen on val, test scored once.

The protocol is identical for every encoder compared (pre-trained, random init), so differences in the
numbers come from the features alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from headct.eval import PREDICTION_COLUMNS
from headct.eval.metrics import auroc, evaluate_binary, youden_threshold

MAX_ITER = 10_000  # lbfgs on standardised features converges well within this


@dataclass
class LabelData:
    """The scans of one split with a known value for one label."""

    x: np.ndarray  # (n, D) float32 features
    y: np.ndarray  # (n,) int8 0/1
    scan_id: np.ndarray  # (n,) str
    patient_id: np.ndarray  # (n,) str


def label_data(frame: pd.DataFrame, features: np.ndarray, label: str) -> LabelData:
    """Rows of `frame` (a split file, aligned with `features` (n, D)) whose `label` is known (not empty)."""
    known = frame[label].notna().to_numpy()
    return LabelData(
        x=features[known],
        y=frame.loc[known, label].to_numpy(dtype=np.int8),
        scan_id=frame.loc[known, "scan_id"].to_numpy(dtype=str),
        patient_id=frame.loc[known, "patient_id"].to_numpy(dtype=str),
    )


@dataclass
class ProbeFit:
    """A fitted probe: the scaler and classifier for the C chosen on val, and the val-chosen threshold."""

    c: float
    threshold: float  # on the probability score; positive when score >= threshold
    val_auroc: dict[float, float]  # val AUROC per C tried
    converged: bool
    scaler: Any
    model: Any

    def score(self, x: np.ndarray) -> np.ndarray:
        """(n, D) features -> (n,) probability of the positive class."""
        # float64 throughout, so the scores written to CSV round-trip exactly against the threshold.
        return self.model.predict_proba(self.scaler.transform(np.asarray(x, dtype=np.float64)))[:, 1]


def fit_probe(train: LabelData, val: LabelData, c_grid: Sequence[float]) -> ProbeFit:
    """Fit one logistic regression per C on standardised train features; keep the best val AUROC.

    Ties go to the smaller C (stronger L2), the simpler model. Test data never enters here.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if not c_grid:
        raise ValueError("c_grid must hold at least one C value")
    scaler = StandardScaler().fit(np.asarray(train.x, dtype=np.float64))
    x_train, x_val = (scaler.transform(np.asarray(d.x, dtype=np.float64)) for d in (train, val))
    fitted: dict[float, tuple[Any, bool]] = {}
    val_auroc: dict[float, float] = {}
    for c in sorted(c_grid):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER).fit(x_train, train.y)
        fitted[c] = (model, not any(issubclass(w.category, ConvergenceWarning) for w in caught))
        val_auroc[c] = auroc(val.y, model.predict_proba(x_val)[:, 1])
    c = max(
        val_auroc, key=val_auroc.__getitem__
    )  # the first maximum in ascending C: ties go to the smaller C
    model, converged = fitted[c]
    threshold = youden_threshold(val.y, model.predict_proba(x_val)[:, 1])
    return ProbeFit(c, threshold, val_auroc, converged, scaler, model)


def choose_variant(val_auroc: Mapping[str, Mapping[str, float]]) -> tuple[str, dict[str, float]]:
    """Per-arm selection on val: `val_auroc[variant][label]` -> (the variant with the highest mean over the labels,
    {variant: that mean}). Ties go to the variant listed first (the arm's default variant when it is there).
    Only val figures enter here, never test."""
    if not val_auroc:
        raise ValueError("no variant to choose from")
    means = {v: float(np.mean(list(per_label.values()))) for v, per_label in val_auroc.items()}
    best = max(means.values())
    return next(v for v, m in means.items() if m == best), means


def predictions_frame(
    part: LabelData,
    split: str,
    label: str,
    model: str,
    score: np.ndarray,
    threshold: float,
    seed: int,
    mode: str = "linear_probe",
    k: int | str = "",
) -> pd.DataFrame:
    """Rows in the predictions CSV schema (`headct.eval.PREDICTION_COLUMNS`); k is empty unless few-shot."""
    frame = pd.DataFrame(
        {
            "scan_id": part.scan_id,
            "patient_id": part.patient_id,
            "split": split,
            "label": label,
            "model": model,
            "mode": mode,
            "k": k,
            "seed": seed,
            "score": score,
            "target": part.y.astype(int),
            "threshold": threshold,
        }
    )
    return frame[list(PREDICTION_COLUMNS)]


def probe_label(
    data: Mapping[str, LabelData],
    label: str,
    model: str,
    c_grid: Sequence[float],
    n_resamples: int,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit on train, select on val, score test once. Returns (test metrics with CIs, val+test predictions)."""
    fit = fit_probe(data["train"], data["val"], c_grid)
    val_score = fit.score(data["val"].x)
    test_score = fit.score(data["test"].x)
    metrics = evaluate_binary(
        data["test"].y, test_score, data["test"].patient_id, fit.threshold, n_resamples, seed
    )
    metrics.update(
        C=fit.c,
        val_auroc=fit.val_auroc[fit.c],
        converged=fit.converged,
        n_train=len(data["train"].y),
        n_val=len(data["val"].y),
    )
    rows = pd.concat(
        [
            predictions_frame(data["val"], "val", label, model, val_score, fit.threshold, seed),
            predictions_frame(data["test"], "test", label, model, test_score, fit.threshold, seed),
        ],
        ignore_index=True,
    )
    return metrics, rows
