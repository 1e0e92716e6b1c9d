"""Plots as PNG (matplotlib's Agg canvas, no display and no global pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from headct.io import atomic_path

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]  # model name -> (targets (n,) 0/1, scores (n,))


def _figure(n_panels: int, title: str, empty_note: str) -> tuple[Any, int, int]:
    """A figure with room for `n_panels` panels (up to 4 per row); says `empty_note` when there are none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, max(1, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(3.2 * cols, 3.3 * rows + 0.4), dpi=110)
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    if not n_panels:
        fig.text(0.5, 0.5, empty_note, ha="center", va="center")
    return fig, rows, cols


def _save(fig: Any, dest: Path) -> Path:
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dest


NO_PANEL = "no label had enough positives and negatives to evaluate"


def plot_roc_grid(panels: Mapping[str, Curves], dest: Path, title: str = "ROC (test)") -> Path:
    """One ROC panel per label, one curve per model (legend shows each AUROC); written atomically to `dest`.

    With no panel (every label skipped) the PNG says so, so the output a pipeline declares always exists.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, rows, cols = _figure(len(panels), title, NO_PANEL)
    for index, (label, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, index + 1)
        for name, (y, score) in curves.items():
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} {roc_auc_score(y, score):.3f}")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.7, color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=label, xlabel="1 - specificity", ylabel="sensitivity")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, title="AUROC", title_fontsize=7)
    return _save(fig, dest)


def plot_pr_grid(panels: Mapping[str, Curves], dest: Path, title: str = "precision-recall (test)") -> Path:
    """One precision-recall panel per label, one curve per model (legend: AP); the dotted line is prevalence."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, rows, cols = _figure(len(panels), title, NO_PANEL)
    for index, (label, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, index + 1)
        prevalence = None
        for name, (y, score) in curves.items():
            precision, recall, _ = precision_recall_curve(y, score)
            ax.step(
                recall,
                precision,
                where="post",
                lw=1.5,
                label=f"{name} {average_precision_score(y, score):.3f}",
            )
            prevalence = float(np.mean(y))
        if prevalence is not None:
            ax.axhline(prevalence, ls=":", lw=0.8, color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=label, xlabel="recall", ylabel="precision")
        ax.legend(loc="upper right", fontsize=7, title="AP", title_fontsize=7)
    return _save(fig, dest)


def plot_reliability_grid(
    panels: Mapping[str, Curves], dest: Path, title: str = "reliability (test)"
) -> Path:
    """Reliability diagrams: observed positive fraction vs mean score per equal-width bin (legend: ECE)."""
    from headct.eval.calibration import reliability_curve

    fig, rows, cols = _figure(len(panels), title, NO_PANEL)
    for index, (label, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, index + 1)
        for name, (y, score) in curves.items():
            curve = reliability_curve(y, score)
            used = curve.count > 0
            ax.plot(
                curve.mean_score[used],
                curve.observed[used],
                marker="o",
                ms=3,
                lw=1.2,
                label=f"{name} {curve.ece:.3f}",
            )
        ax.plot([0, 1], [0, 1], ls="--", lw=0.7, color="grey")
        ax.set(
            xlim=(0, 1), ylim=(0, 1.01), title=label, xlabel="mean score", ylabel="observed positive fraction"
        )
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=7, title="ECE", title_fontsize=7)
    return _save(fig, dest)


Spread = Mapping[int, tuple[float, float, float]]  # K -> (mean, low, high)


def plot_fewshot_curves(
    panels: Mapping[str, Mapping[str, Spread]], dest: Path, title: str = "few-shot test AUROC vs K"
) -> Path:
    """One panel per label (plus any summary panel the caller adds): mean AUROC vs K per model, band low-high."""
    fig, rows, cols = _figure(len(panels), title, "no label could be sampled at any K")
    for index, (label, models) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, index + 1)
        for name, by_k in models.items():
            ks = sorted(by_k)
            mean, low, high = (np.array([by_k[k][i] for k in ks]) for i in range(3))
            (line,) = ax.plot(ks, mean, marker="o", ms=3, lw=1.5, label=name)
            ax.fill_between(ks, low, high, alpha=0.2, color=line.get_color(), lw=0)
        ax.axhline(0.5, ls="--", lw=0.7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set(ylim=(0.0, 1.01), title=label, xlabel="K (positives = negatives per label)", ylabel="AUROC")
        ax.legend(loc="lower right", fontsize=7)
    return _save(fig, dest)


def plot_retrieval_bars(
    scores: Mapping[str, Mapping[str, float]],
    chance: Mapping[str, float],
    dest: Path,
    title: str = "retrieval mAP (test, cosine)",
) -> Path:
    """Grouped bars: mAP per label (x) and model (colour); a black tick marks each label's chance level."""
    labels = list(chance)
    fig, _, _ = _figure(1 if labels else 0, title, "no label had enough positives to query")
    fig.set_size_inches(max(6.0, 0.9 * len(labels) + 2), 4.0)
    if labels:
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / max(1, len(scores))
        x = np.arange(len(labels))
        for i, (name, per_label) in enumerate(scores.items()):
            ax.bar(
                x + (i - (len(scores) - 1) / 2) * width,
                [per_label.get(lab, np.nan) for lab in labels],
                width,
                label=name,
            )
        ax.scatter(
            x, [chance[lab] for lab in labels], marker="_", s=400, color="black", label="chance", zorder=3
        )
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set(ylim=(0, 1.01), ylabel="mAP")
        ax.legend(fontsize=7)
    return _save(fig, dest)


def plot_radar(scores: Mapping[str, Mapping[str, float]], dest: Path, title: str = "test AUROC per label") -> Path:
    """One polygon per model over one spoke per label (AUROC, radius 0.4 to 1; the dashed circle is chance),
    as in FM-HCT's comparison figure. Labels missing for a model are drawn at the centre."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(lab for per_label in scores.values() for lab in per_label))
    fig = Figure(figsize=(6.4, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    if len(labels) < 3:
        fig.text(0.5, 0.5, f"a radar needs >= 3 labels; got {labels}", ha="center", va="center")
        return _save(fig, dest)
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False)
    ax = fig.add_subplot(1, 1, 1, projection="polar")
    ring = np.concatenate([angles, angles[:1]])
    for name, per_label in scores.items():
        values = np.array([per_label.get(lab, 0.4) for lab in labels])
        ax.plot(ring, np.concatenate([values, values[:1]]), lw=1.6, label=name)
        ax.fill(ring, np.concatenate([values, values[:1]]), alpha=0.08)
    ax.plot(np.linspace(0, 2 * np.pi, 200), np.full(200, 0.5), ls="--", lw=0.8, color="grey")
    ax.set_xticks(angles, labels, fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_yticks([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.12), fontsize=8)
    return _save(fig, dest)
