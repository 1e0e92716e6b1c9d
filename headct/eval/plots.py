"""Plots as PNG (matplotlib's Agg canvas, no display and no global pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from headct.io import atomic_path

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]  # model name -> (targets (n,) 0/1, scores (n,))


def plot_roc_grid(panels: Mapping[str, Curves], dest: Path, title: str = "ROC (test)") -> Path:
    """One ROC panel per label, one curve per model (legend shows each AUROC); written atomically to `dest`.

    With no panel (every label skipped) the PNG says so, so the output a pipeline declares always exists.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(3.2 * cols, 3.3 * rows + 0.4), dpi=110)
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    if not panels:
        fig.text(0.5, 0.5, "no label had enough positives and negatives to probe", ha="center", va="center")
    for index, (label, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, index + 1)
        for name, (y, score) in curves.items():
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} {roc_auc_score(y, score):.3f}")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.7, color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=label, xlabel="1 - specificity", ylabel="sensitivity")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, title="AUROC", title_fontsize=7)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dest
