"""Masked restoration for the small 3D CNN (pre-training method `mim`) and its reconstruction residual read-out.

Why it exists (issue 9's lever study, seed 7's val, `benchmarks/evidence/README.md`): on CPU budgets no pooled
*embedding* of a pre-trained encoder (ViT MAE or DINO, or this CNN) moved ICH clear of its random init's spread,
because a 2-30 mL finding is diluted in a global pool; but a model that has learned what a normal head looks like
can say *where a head is not normal*: the part of a hidden cube it could not restore from the cube's context. That
residual, smoothed and summarised, is what a few labels then read (the random-init twin gets the same read-out from
its untrained head; the HU histogram stays the separate non-learned arm).

Masking (SparK-like, with zeroed cubes rather than sparse convolutions): the volume is cut into cubes of `cube`
voxels (the stride of the encoder's second-to-last unit: 8 voxels, 24 mm at 3 mm, for the default four units); a
share `mask_ratio` of the cubes is zeroed in every window channel, and a light head on the last two stages predicts
every cube's voxels per channel (a pixel shuffle: MAE's linear output layer, for a CNN). The loss is the mean squared
error over the hidden voxels only, in window units ([0, 1]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headct.models.cnn import SmallCNN3D

# The residual read-out: the windows summarised (0 = brain 40/80, 1 = subdural 80/200 of the default windows), the
# quantiles of the positive (hyperdense) and negative (hypodense) parts, and the shares of voxels above these
# thresholds (window units). 2 x 14 numbers per scan; fixed on seed 7's val before any declared seed was run.
RESIDUAL_CHANNELS = (0, 1)
RESIDUAL_QUANTILES = (0.5, 0.9, 0.99, 0.999)
RESIDUAL_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
RESIDUAL_PASSES = 4  # masks per volume: a cube stays visible in all four with probability 0.4^4 = 2.6 %
RESIDUAL_SEED = 123  # the read-out's masks are fixed: the same for every volume, arm and run
RESIDUAL_DIM = len(RESIDUAL_CHANNELS) * (2 * len(RESIDUAL_QUANTILES) + 2 + len(RESIDUAL_THRESHOLDS))


class RestorationHead(nn.Module):
    """The last stage upsampled onto the one before (stride `cube`), mixed, then each position predicts its `cube`^3
    voxels per channel. A full-resolution decoder ran at < 3 volumes/s on 2 CPU cores; this one keeps ~25."""

    def __init__(self, last: int, before: int, out_chans: int, cube: int, width: int = 64) -> None:
        super().__init__()
        self.out_chans, self.cube = out_chans, cube
        self.up = nn.ConvTranspose3d(last, before, 2, 2)
        self.mix = nn.Sequential(nn.Conv3d(2 * before, width, 1), nn.GELU(),
                                 nn.Conv3d(width, width, 3, padding=1), nn.GELU())
        self.pred = nn.Conv3d(width, out_chans * cube**3, 1)

    def forward(self, before: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        y = self.pred(self.mix(torch.cat([self.up(last), before], 1)))  # (B, C * p^3, gx, gy, gz)
        b, _, gx, gy, gz = y.shape
        p = self.cube
        y = y.reshape(b, self.out_chans, p, p, p, gx, gy, gz).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.out_chans, gx * p, gy * p, gz * p)


class MaskedRestoration(nn.Module):
    """The small CNN encoder plus its restoration head.

    Args:
        encoder: a `SmallCNN3D` of at least two units (what the model directory keeps).
        mask_ratio: share of cubes hidden in training.
    """

    def __init__(self, encoder: SmallCNN3D, mask_ratio: float = 0.6) -> None:
        super().__init__()
        channels = list(encoder.arch["channels"])
        if len(channels) < 2:
            raise ValueError(f"masked restoration needs a CNN of at least two units, got channels {channels}")
        self.encoder, self.mask_ratio = encoder, mask_ratio
        self.in_chans = int(encoder.arch["in_chans"])
        self.cube = 2 ** (len(channels) - 1)  # the stride of the second-to-last unit
        self.head = RestorationHead(channels[-1], channels[-2], self.in_chans, self.cube)

    def check_grid(self, volumes: torch.Tensor) -> None:
        step = 2 * self.cube  # the last unit's stride
        if any(s % step for s in volumes.shape[2:]):
            raise ValueError(f"masked restoration needs a grid divisible by {step} voxels per axis (the CNN's "
                             f"stride), got {list(volumes.shape[2:])}")

    def random_keep(self, volumes: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 1, X, Y, Z) float: 1 where visible, 0 in the hidden cubes (drawn on the generator's device)."""
        b = volumes.shape[0]
        grid = [s // self.cube for s in volumes.shape[2:]]
        device = generator.device if generator is not None else volumes.device
        keep = (torch.rand(b, 1, *grid, generator=generator, device=device) >= self.mask_ratio).float()
        return F.interpolate(keep.to(volumes.device), scale_factor=self.cube, mode="nearest")

    def restore(self, volumes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Every voxel predicted from the visible cubes only (B, C, X, Y, Z)."""
        maps, x = [], volumes * keep
        for unit in self.encoder.units:
            x = unit(x)
            maps.append(x)
        return self.head(maps[-2], maps[-1])

    def forward(self, volumes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, X, Y, Z) in [0, 1] -> the mean squared error over the hidden voxels of every channel."""
        self.check_grid(volumes)
        keep = self.random_keep(volumes, generator)
        hidden = 1.0 - keep
        error = (self.restore(volumes, keep) - volumes) ** 2 * hidden
        return error.sum() / (hidden.sum() * volumes.shape[1]).clamp(min=1.0)

    @torch.no_grad()
    def reconstruct(self, volumes: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: (hidden mask (B, 1, X, Y, Z), 1 = hidden; the input with its hidden cubes restored)."""
        keep = self.random_keep(volumes, generator)
        restored = volumes * keep + self.restore(volumes, keep) * (1.0 - keep)
        return 1.0 - keep, restored

    def residual_map(self, volumes: torch.Tensor, passes: int = RESIDUAL_PASSES, seed: int = RESIDUAL_SEED
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed residual input - restoration, averaged over the passes where each voxel was hidden (B, C, X, Y,
        Z); hidden at least once (B, X, Y, Z) bool). The masks come from `seed` alone, so every volume, batch and
        arm is probed with the same ones. Differentiable (fine-tuning through the read-out, `ResidualReadout`);
        extraction calls it under inference mode."""
        self.check_grid(volumes)
        generator = torch.Generator().manual_seed(seed)
        total = torch.zeros_like(volumes)
        count = torch.zeros_like(volumes[:, :1])
        for _ in range(passes):
            grid = [s // self.cube for s in volumes.shape[2:]]
            keep = (torch.rand(1, 1, *grid, generator=generator) >= self.mask_ratio).float()
            keep = F.interpolate(keep, scale_factor=self.cube, mode="nearest").to(volumes.device, volumes.dtype)
            keep = keep.expand(volumes.shape[0], -1, -1, -1, -1)
            hidden = 1.0 - keep
            total = total + (volumes - self.restore(volumes, keep)) * hidden
            count = count + hidden
        return total / count.clamp(min=1.0), count[:, 0] > 0

    def residual_summary(self, volumes: torch.Tensor, passes: int = RESIDUAL_PASSES, seed: int = RESIDUAL_SEED
                         ) -> torch.Tensor:
        """(B, C, X, Y, Z) windows -> (B, RESIDUAL_DIM): per summarised window, the 3^3-smoothed residual's
        positive-part and negative-part quantiles, its positive mean and mean square, and the shares of voxels
        whose positive part passes each threshold (over the voxels hidden at least once). Differentiable except
        the shares (counts carry no gradient); `residual_features` is the same without gradients."""
        residual, seen = self.residual_map(volumes, passes, seed)
        smooth = F.avg_pool3d(residual[:, list(RESIDUAL_CHANNELS)], 3, 1, 1)  # a blob, not one noisy voxel
        q = torch.tensor(RESIDUAL_QUANTILES, device=volumes.device)
        rows = []
        for b in range(volumes.shape[0]):
            row = []
            for c in range(smooth.shape[1]):
                v = smooth[b, c][seen[b]].float()
                pos, neg = v.clamp(min=0), (-v).clamp(min=0)
                row += [torch.quantile(pos, q), torch.quantile(neg, q), pos.mean()[None], (v**2).mean()[None],
                        torch.stack([(pos > t).float().mean() for t in RESIDUAL_THRESHOLDS])]
            rows.append(torch.cat(row))
        return torch.stack(rows)

    @torch.no_grad()
    def residual_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """`residual_summary` without gradients: the frozen read-out `headct extract` writes (pool `residual`)."""
        return self.residual_summary(volumes)

    @torch.no_grad()
    def residual_heat(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) windows -> (B, X, Y, Z): the hyperdense part of the first summarised window's smoothed
        residual (what the model could not restore and is brighter than it expected: blood, in the brain window),
        summing to 1 per volume (an explanation map, `headct explain`'s `residual` method)."""
        residual, _ = self.residual_map(volumes)
        heat = F.avg_pool3d(residual[:, RESIDUAL_CHANNELS[0]: RESIDUAL_CHANNELS[0] + 1], 3, 1, 1)[:, 0].clamp(min=0)
        return heat / heat.flatten(1).sum(1).clamp(min=1e-12)[:, None, None, None]


class ResidualReadout(nn.Module):
    """The masked-restoration model as a classifier backbone (`finetune.pool: residual`): its one token is the
    residual summary (`MaskedRestoration.residual_summary`, RESIDUAL_DIM numbers), so fine-tuning trains the
    encoder and restoration head end to end through the read-out that `headct extract` freezes, and a linear head
    reads it. Why: the small CNN's pooled features carry no ICH signal (a global max or mean dilutes a 2-30 mL
    bleed), so fine-tuning them measured nothing of pre-training (issue 9's first fine-tuned arms); the same
    read-out at random init is the fair twin. `arch` adds `readout` and `mask_ratio` to the CNN's, enough for
    `headct.models.resnet.build_backbone` to rebuild it from a classifier directory's config.json.

    In training mode each forward draws one mask (a seed from torch's global generator, which the job seeds) instead
    of the read-out's four fixed ones: a quarter of the cost (four passes ran at under 1 volume/s on 2 cores) and a
    new mask every step, as in pre-training; a resumed run therefore draws other masks than an uninterrupted one.
    In eval mode (validation, test, `headct predict`) it is the fixed four-mask read-out, deterministic per volume.
    """

    def __init__(self, restoration: MaskedRestoration) -> None:
        super().__init__()
        self.restoration = restoration
        self.arch: dict[str, Any] = {**restoration.encoder.arch, "readout": "residual",
                                     "mask_ratio": float(restoration.mask_ratio)}
        self.embed_dim = RESIDUAL_DIM

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, 1, RESIDUAL_DIM): the residual summary as the only (global) token."""
        if self.training:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            return self.restoration.residual_summary(x, passes=1, seed=seed)[:, None]
        return self.restoration.residual_summary(x)[:, None]
