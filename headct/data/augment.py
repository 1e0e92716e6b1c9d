"""Batched augmentation of HU volumes on the training device, its randomness drawn from a step-seeded generator.

Random numbers are drawn on the CPU generator in a fixed order (flip, scale, offset) whatever the flags, so
switching one augmentation off does not change the draws of the others, and a resumed run draws the same.
"""

from __future__ import annotations

import torch


def augment_hu(
    hu: torch.Tensor,
    generator: torch.Generator,
    flip_lr: bool = True,
    jitter_hu: float = 0.0,
    jitter_scale: float = 0.0,
) -> torch.Tensor:
    """(B, X, Y, Z) int16/float HU, RAS+ axes -> (B, X, Y, Z) float32 HU, on hu's device.

    Args:
        hu: a batch of canonical volumes (array axis 0 is x, left -> right).
        generator: a CPU torch.Generator (seeded from the global step by the caller).
        flip_lr: mirror each volume left-right with probability 1/2 (heads are nearly symmetric).
        jitter_hu: per-volume offset drawn uniformly in [-jitter_hu, jitter_hu] HU (calibration drift).
        jitter_scale: per-volume gain drawn uniformly in [1 - jitter_scale, 1 + jitter_scale].
    """
    if hu.dim() != 4:
        raise ValueError(f"expected a (B, X, Y, Z) HU batch, got shape {list(hu.shape)}")
    b = hu.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    gain = 1.0 + jitter_scale * (2 * torch.rand(b, generator=generator) - 1)
    offset = jitter_hu * (2 * torch.rand(b, generator=generator) - 1)
    if flip_lr and bool(flip.any()):
        hu = torch.where(flip.to(hu.device).view(b, 1, 1, 1), hu.flip(1), hu)
    out = hu.float()
    if jitter_hu or jitter_scale:
        out = torch.addcmul(offset.to(out.device).view(b, 1, 1, 1), out, gain.to(out.device).view(b, 1, 1, 1))
    return out
