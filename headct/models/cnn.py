"""A small 3D CNN from scratch (the supervised ceiling on CPU budgets) behind the ViT's token interface.

Why it exists: a supervised ceiling needs a model that learns from abundant labels within the benchmark's budget.
The 3D ResNets run at about 1-2 volumes/s on 2 CPU cores (an epoch of 1,900 scans takes half an hour) and the ViT
from scratch barely learns focal findings in that time; a few strided MONAI residual units (about 0.1 GFLOP per
64^3 volume) learn small hyperdense lesions in a few epochs. Token 0 is the global *max* of the last feature map
(a focal finding anywhere in the head fires it; an average would dilute a 2 mL bleed in 1,500 mL of brain), tokens
1..N its spatial positions, so `headct.models.heads.Classifier`'s "cls" head reads the max and "attentive" the map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from headct.models.vit import pool_tokens

DEFAULT_CHANNELS: tuple[int, ...] = (8, 16, 32, 64)  # one stride-2 residual unit each: 64^3 -> 4^3 positions


class SmallCNN3D(nn.Module):
    """Strided MONAI residual units (2 conv subunits each, batch norm); D = the last channel count.

    Args:
        in_chans: input channels (HU windows).
        channels: output channels of the stride-2 units, in order (the volume shrinks 2x per unit).
    """

    def __init__(self, in_chans: int = 3, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        if not channels or any(c < 1 or c > 1024 for c in channels):
            raise ValueError(f"channels must be 1..1024 each and at least one unit, got {list(channels)}")
        from monai.networks.blocks import ResidualUnit

        units, c_in = [], in_chans
        for c in channels:
            units.append(ResidualUnit(3, c_in, c, strides=2, subunits=2, norm="batch"))
            c_in = c
        self.units = nn.Sequential(*units)
        self.arch: dict[str, Any] = {"name": "cnn", "in_chans": in_chans, "channels": list(channels)}
        self.embed_dim = c_in

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, 1 + N, D): the global max first, then the last feature map's positions."""
        tokens = self.units(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([tokens.amax(dim=1, keepdim=True), tokens], dim=1)

    def forward_pooled(self, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, D): "cls" = the global max (token 0), "mean" = the mean over positions; as
        `ViT3D.forward_pooled`, so `headct.load_encoder(...).embed` serves a masked-restoration model directory."""
        return pool_tokens(self.forward_features(x), pool)
