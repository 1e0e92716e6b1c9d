"""Attention / occlusion montages: axial slices in the brain window with the map overlaid (PNG, Agg canvas).

One row per (label, scan), one column per axial slice; slices are spread evenly over the axial extent where the
map carries most of its mass inside the head (the 10th to 90th percentile of its z profile), so the figure shows
where the model looks rather than empty vertex or skull-base slices. The overlay is drawn inside the head only
(the maps themselves are untouched). Rows are labelled with the scan's pseudonym only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headct.io import atomic_path


@dataclass
class MontageRow:
    """One row of a montage: the label shown, the scan pseudonym, a display volume in [0, 1] (X, Y, Z, RAS+) and
    a map (X, Y, Z) of the same shape (any non-negative scale; min-maxed for display)."""

    label: str
    scan_id: str
    volume: np.ndarray
    heat: np.ndarray
    head: np.ndarray | None = None  # (X, Y, Z) bool: the overlay is drawn inside it only


def slices_for(heat: np.ndarray, n: int, head: np.ndarray | None = None) -> list[int]:
    """n axial (z) indices spread over the central 80% of the map's mass along z (inside `head` when given)."""
    profile = (heat if head is None else heat * head).sum(axis=(0, 1))
    if profile.sum() <= 0:
        profile = heat.sum(axis=(0, 1))
    cdf = np.cumsum(profile) / max(float(profile.sum()), 1e-12)
    lo, hi = int(np.searchsorted(cdf, 0.1)), int(np.searchsorted(cdf, 0.9))
    hi = max(hi, lo)
    return [int(round(z)) for z in np.linspace(lo, hi, n)]


def plot_montage(rows: Sequence[MontageRow], n_slices: int, dest: Path, title: str) -> Path:
    """Rows x n_slices axial panels (anterior up, patient left on the image right as radiologists view)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.7 * n_slices + 1.2, 1.8 * max(1, len(rows)) + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=9)
    if not rows:
        fig.text(0.5, 0.5, "no scan to explain (no label had a positive scan in this split)", ha="center")
    for r, row in enumerate(rows):
        shown = row.heat if row.head is None else row.heat * row.head  # maps are not drawn over air
        heat = shown / max(float(shown.max()), 1e-12)
        for c, z in enumerate(slices_for(row.heat, n_slices, row.head)):
            ax = fig.add_subplot(max(1, len(rows)), n_slices, r * n_slices + c + 1)
            # Array axis 0 runs left -> right (RAS+); radiological display puts the patient's left on the right.
            ax.imshow(row.volume[::-1, :, z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
            # Only the upper 80% of the map's range is coloured, so the hot spots stand out on the anatomy.
            ax.imshow(np.ma.masked_less(heat[::-1, :, z].T, 0.2), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                      origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z={z}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{row.label}\n{row.scan_id[:12]}", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # leave the title its own line
    with atomic_path(Path(dest), suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(dest)
