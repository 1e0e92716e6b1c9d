"""HU windows -> network input channels, applied in batch on the training device.

Volumes stay int16 HU on disk; each window (level/width in HU) becomes one channel, clipped and scaled to
[0, 1]: level - width/2 maps to 0, level + width/2 maps to 1. Changing windows needs no re-ingest.
Import-light (torch only), so a GPU script can use it without pydantic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def window_bounds(windows: Sequence[Any] | None = None) -> list[tuple[float, float]]:
    """(level, width) pairs in HU from Window models, mappings with level/width, or (level, width) tuples.

    None means headct.config.DEFAULT_WINDOWS (brain 40/80, subdural 80/200, bone 600/2800).
    """
    if windows is None:
        from headct.config.base import DEFAULT_WINDOWS

        windows = DEFAULT_WINDOWS
    pairs = []
    for w in windows:
        if isinstance(w, Mapping):
            level, width = w["level"], w["width"]
        elif isinstance(w, tuple | list):
            level, width = w
        else:
            level, width = w.level, w.width
        if width <= 0:
            raise ValueError(f"window width must be > 0 HU, got {width} (level {level})")
        pairs.append((float(level), float(width)))
    if not pairs:
        raise ValueError("at least one HU window is needed")
    return pairs


def hu_to_windows(hu: torch.Tensor, windows: Sequence[Any] | None = None) -> torch.Tensor:
    """(B, X, Y, Z) HU, int16 or float -> (B, C, X, Y, Z) float32 in [0, 1], on hu's device; C = len(windows)."""
    if hu.dim() != 4:
        raise ValueError(f"expected a (B, X, Y, Z) HU batch, got shape {list(hu.shape)}")
    bounds = torch.tensor(window_bounds(windows), dtype=torch.float32, device=hu.device)
    low = (bounds[:, 0] - bounds[:, 1] / 2).view(1, -1, 1, 1, 1)
    width = bounds[:, 1].view(1, -1, 1, 1, 1)
    return (hu.float()[:, None] - low).div_(width).clamp_(0.0, 1.0)  # one (B, C, ...) allocation
