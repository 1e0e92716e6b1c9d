"""Few-shot sampling and scoring: K positive and K negative training examples per label, drawn by patient.

Sampling: a patient is positive for a label when any of their scans is, negative when all their known scans are
negative. K positive and K negative *patients* are drawn without replacement (so the 2K examples come from 2K
different patients), and one scan per drawn patient is taken (a positive scan for a positive patient). The draw
is a function of (seed, label) only: a seeded permutation of the sorted patient ids whose first K are taken, so
the same seed gives the same patients, different seeds give different ones, and the K=2 sample contains the
K=1 sample (nested draws make the AUROC-vs-K curve less noisy).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from headct.eval.probe import LabelData


@dataclass
class ShotSample:
    """Indices (into a LabelData) of the 2K scans drawn, or why K cannot be drawn."""

    index: np.ndarray | None  # (2K,) int, positives first; None when skipped
    reason: str | None = None


def _rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def _draw(
    patients: np.ndarray,
    eligible: np.ndarray,
    patient_of: np.ndarray,
    key: np.ndarray,
    k: int,
    order: np.ndarray,
) -> np.ndarray:
    """The first k patients of `order` (a permutation of `patients`), one eligible scan each (lowest key)."""
    chosen = []
    for patient in patients[order[:k]]:
        scans = np.flatnonzero(eligible & (patient_of == patient))
        chosen.append(scans[np.argmin(key[scans])])
    return np.asarray(chosen, dtype=np.int64)


def sample_shots(train: LabelData, k: int, seed: int, label: str) -> ShotSample:
    """K positive and K negative scans from 2K distinct train patients (see the module docstring)."""
    rng = _rng(seed, label)
    patient_of = train.patient_id
    positive_patients = np.unique(patient_of[train.y == 1])
    negative_patients = np.setdiff1d(np.unique(patient_of[train.y == 0]), positive_patients)
    if len(positive_patients) < k or len(negative_patients) < k:
        return ShotSample(
            None,
            f"K={k} needs {k} positive and {k} negative train patients; "
            f"train has {len(positive_patients)} positive and {len(negative_patients)} negative",
        )
    # Drawn in a fixed sequence so every value depends on (seed, label) alone, not on K.
    pos_order = rng.permutation(len(positive_patients))
    neg_order = rng.permutation(len(negative_patients))
    key = rng.random(len(train.y))
    pos = _draw(positive_patients, train.y == 1, patient_of, key, k, pos_order)
    neg = _draw(negative_patients, train.y == 0, patient_of, key, k, neg_order)
    return ShotSample(np.concatenate([pos, neg]))


def subset(data: LabelData, index: np.ndarray) -> LabelData:
    return LabelData(data.x[index], data.y[index], data.scan_id[index], data.patient_id[index])


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample, ddof=1; 0 for one value), min and max of per-seed results."""
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n_seeds": len(v),
    }
