"""Figures of a pre-training run: the loss curve, MAE reconstructions, DINO views (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headct.io import atomic_path


def plot_loss_curve(
    losses: Sequence[float], path: Path, title: str = "MAE training loss", ylabel: str = "masked-patch MSE"
) -> Path:
    """Per-step loss (faint) and its moving average over ~2% of the run (bold), log-scaled y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(losses, dtype=float)
    steps = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, y, lw=0.6, alpha=0.35, color="tab:blue", label="per step")
    k = max(1, len(y) // 50)
    if len(y) >= k > 1:
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, color="tab:blue", label=f"mean of {k} steps")
    if len(y) and np.all(y > 0):
        ax.set_yscale("log")
    ax.set(xlabel="global step", ylabel=ylabel, title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_reconstruction(
    volume: np.ndarray, mask: np.ndarray, recon: np.ndarray, path: Path, channel_name: str = "brain",
    title: str | None = None,
) -> Path:
    """Mid axial and coronal slices of one window channel: input / masked input / reconstruction.

    volume, recon: (X, Y, Z) in [0, 1] (RAS+ array axes); mask: (X, Y, Z), 1 = hidden from the encoder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = np.ma.masked_where(mask > 0.5, volume)  # hidden patches drawn in a colour no voxel has
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#2b4c7e")
    x, y, z = (s // 2 for s in volume.shape)
    views = {
        "axial": lambda v: v[:, :, z].T,  # rows = y (posterior -> anterior, shown upward)
        "coronal": lambda v: v[:, y, :].T,  # rows = z (inferior -> superior, shown upward)
    }
    columns = {"input": volume, "masked": masked, "reconstruction": recon}
    fig, axes = plt.subplots(len(views), len(columns), figsize=(8, 5.6), dpi=110)
    for r, (view, cut) in enumerate(views.items()):
        for c, (name, vol) in enumerate(columns.items()):
            ax = axes[r, c]
            ax.imshow(cut(vol), cmap=cmap, vmin=0, vmax=1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(view)
    fig.suptitle(title or f"MAE on a held-out volume ({channel_name} window)")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_views(global_views: Sequence[np.ndarray], local_views: Sequence[np.ndarray], path: Path, title: str) -> Path:
    """Mid-axial slice of each DINO view, globals on the first row, locals on the second; views (X, Y, Z) in
    [0, 1]. Shows what the student is asked to match: crops inside the head, the local ones smaller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(global_views), len(local_views), 1)
    rows = [("global", global_views), ("local", local_views)]
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.8), dpi=110, squeeze=False)
    for r, (kind, views) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(views):
                v = views[c]
                ax.imshow(v[:, :, v.shape[2] // 2].T, cmap="gray", vmin=0, vmax=1, origin="lower")
                ax.set_title(f"{kind} {c + 1} ({v.shape[0]}^3)" if len(set(v.shape)) == 1 else f"{kind} {c + 1}",
                             fontsize=8)
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
