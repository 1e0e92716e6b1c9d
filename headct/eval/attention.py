"""Where an encoder looks: CLS attention, attention rollout and occlusion sensitivity, as maps on the volume grid.

Every map returned here is a float32 (X, Y, Z) array on the canonical volume grid, non-negative and summing to
1 over the voxels (a distribution of "where the evidence is"), so maps of different scans, methods and models
are on one scale. Figures min-max them for display only.

- CLS attention: the last block's attention from the CLS token to each patch token, mean over heads (Caron et
  al. 2021 show it for DINO); registers and CLS are dropped and the patch weights renormalised.
- Attention rollout (Abnar & Zuidema 2020): per block, the head-mean attention plus the identity (the residual
  path), rows renormalised, multiplied from the first block to the last; the CLS row over the patches.
- Occlusion sensitivity (Zeiler & Fergus 2014): model-agnostic; each patch-sized cube that lies in the head (at
  least 10% of its voxels above -300 HU) is in turn replaced by a baseline HU, and the drop in the score is the
  patch's importance (increases are clipped to 0). Cubes of air are not occluded: filling air with tissue would
  paint a new object, not remove evidence.
Token maps (gx, gy, gz) are upsampled trilinearly to the voxel grid (each token covers patch^3 voxels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _to_volume(token_map: torch.Tensor, volume_shape: Sequence[int]) -> np.ndarray:
    """(B, gx, gy, gz) non-negative token weights -> (B, X, Y, Z) float32 maps, each summing to 1."""
    up = F.interpolate(token_map[:, None].float(), size=tuple(volume_shape), mode="trilinear", align_corners=False)
    up = up[:, 0].clamp_min(0)
    total = up.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (up / total).cpu().numpy().astype(np.float32)


def _patch_part(weights: torch.Tensor, encoder: Any, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T) CLS-row weights over all tokens -> (B, gx, gy, gz) over the patches, renormalised."""
    patches = weights[:, encoder.num_prefix_tokens:]
    patches = patches / patches.sum(1, keepdim=True).clamp_min(1e-12)
    return patches.reshape(-1, *grid)


@torch.no_grad()
def cls_attention(encoder: Any, x: torch.Tensor) -> np.ndarray:
    """Windowed volumes (B, C, X, Y, Z) -> last-block CLS-to-patch attention, mean over heads, (B, X, Y, Z)."""
    (last,) = encoder.attention_maps(x, blocks="last")  # (B, H, T, T)
    return _to_volume(_patch_part(last.mean(1)[:, 0], encoder, encoder.grid_of(x)), x.shape[2:])


@torch.no_grad()
def attention_rollout(encoder: Any, x: torch.Tensor, residual: float = 0.5) -> np.ndarray:
    """Windowed volumes (B, C, X, Y, Z) -> attention rollout from CLS, (B, X, Y, Z).

    residual: weight of the identity added to each block's head-mean attention (0.5 as in Abnar & Zuidema).
    """
    maps = encoder.attention_maps(x, blocks="all")
    t = maps[0].shape[-1]
    eye = torch.eye(t, dtype=torch.float32, device=x.device)
    rollout = eye.expand(x.shape[0], t, t)
    for attn in maps:
        a = (1 - residual) * attn.float().mean(1) + residual * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return _to_volume(_patch_part(rollout[:, 0], encoder, encoder.grid_of(x)), x.shape[2:])


@torch.no_grad()
def occlusion_sensitivity(
    score: Callable[[torch.Tensor], torch.Tensor], hu: torch.Tensor, patch: int, baseline_hu: float = 30.0,
    batch_size: int = 16, head_hu: float = -300.0, min_head_fraction: float = 0.1,
) -> np.ndarray:
    """HU volume (X, Y, Z) and a scorer (B, X, Y, Z) HU -> (B,) -> occlusion map (X, Y, Z), summing to 1.

    Each non-overlapping patch^3 cube in the head is set to `baseline_hu` (default 30 HU, brain parenchyma, so a
    bleed or a mass "disappears" into normal tissue) and the score drop is recorded; a map with no drop anywhere
    is uniform over the head's cubes. Costs one scorer call per head cube (at most 64 at 64^3 / 16, 512 at
    96^3 / 12), batched.
    """
    if hu.dim() != 3 or any(s % patch for s in hu.shape):
        raise ValueError(f"expected one (X, Y, Z) volume divisible by patch {patch}, got {list(hu.shape)}")
    grid = tuple(s // patch for s in hu.shape)
    reference = score(hu[None].float())[0]
    head = (hu > head_hu).float().reshape(grid[0], patch, grid[1], patch, grid[2], patch).mean(dim=(1, 3, 5))
    cubes = [(i, j, k) for i in range(grid[0]) for j in range(grid[1]) for k in range(grid[2])
             if head[i, j, k] >= min_head_fraction]
    drops = torch.zeros(len(cubes))
    for start in range(0, len(cubes), batch_size):
        chunk = cubes[start : start + batch_size]
        batch = hu[None].float().repeat(len(chunk), 1, 1, 1)
        for n, (i, j, k) in enumerate(chunk):
            batch[n, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch, k * patch : (k + 1) * patch] = baseline_hu
        drops[start : start + len(chunk)] = (reference - score(batch)).float().cpu()
    drops = drops.clamp_min(0)
    if float(drops.sum()) == 0.0:
        drops = torch.ones_like(drops)  # no drop anywhere: uniform over the head's cubes
    token_map = torch.zeros(grid)
    for (i, j, k), drop in zip(cubes, drops, strict=True):
        token_map[i, j, k] = drop
    return _to_volume(token_map[None], hu.shape)[0]
