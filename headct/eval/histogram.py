"""The non-learned baseline: a per-volume histogram of Hounsfield units as the feature vector.

Features per volume (all fractions, so they sum to 1 within each group and do not depend on head size):
  * `fine_bins` equal-width bins over [fine_range) HU (default 64 bins over [-100, 200) HU, 4.7 HU each:
    CSF, white/grey matter, blood, calcification), as fractions of the in-head voxels (>= -200 HU);
  * 5 coarse bins over every voxel: air (< -200 HU), fat [-200, -100), the fine range [-100, 200),
    dense tissue / partial-volume bone [200, 700) and bone (>= 700 HU).
If a logistic regression on these matches a learned encoder, the task is solvable from intensity alone, and the
synthetic data needs harder cases.
"""

from __future__ import annotations

import numpy as np

COARSE_EDGES_HU: tuple[float, ...] = (-200.0, -100.0, 200.0, 700.0)  # air | fat | brain range | dense | bone
HEAD_MIN_HU = -200.0


def hu_histogram(
    hu: np.ndarray, fine_bins: int = 64, fine_range: tuple[float, float] = (-100.0, 200.0)
) -> np.ndarray:
    """(B, X, Y, Z) or (X, Y, Z) HU volumes -> (B, fine_bins + 5) float32 histogram features (fractions)."""
    hu = np.asarray(hu)
    if hu.ndim == 3:
        hu = hu[None]
    flat = hu.reshape(len(hu), -1).astype(np.float32)
    low, high = fine_range
    width = (high - low) / fine_bins
    out = np.zeros((len(flat), fine_bins + len(COARSE_EDGES_HU) + 1), dtype=np.float32)
    for i, v in enumerate(flat):
        head = max(int((v >= HEAD_MIN_HU).sum()), 1)
        inside = v[(v >= low) & (v < high)]
        fine = np.bincount(
            ((inside - low) / width).astype(np.int64).clip(0, fine_bins - 1), minlength=fine_bins
        )
        out[i, :fine_bins] = fine / head
        out[i, fine_bins:] = np.bincount(
            np.searchsorted(COARSE_EDGES_HU, v, side="right"), minlength=5
        ) / len(v)
    return out
