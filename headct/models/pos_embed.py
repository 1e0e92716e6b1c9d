"""Fixed 3D sine-cosine position embeddings, and their resampling to another token grid.

The 3D form extends the 1D "Attention is all you need" embedding the way MAE (He et al. 2021) extends it to 2D:
the width is split in three, one part per grid axis (x, y, z), each half sine and half cosine.
Token order is the Conv3d patch order, (x, y, z) C-order, so row ``i`` of the table is the patch at
``(i // (gy * gz), (i // gz) % gy, i % gz)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions (grid units, may be fractional) -> (N, dim) embedding; ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"a 1D sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = True) -> torch.Tensor:
    """The table for a (gx, gy, gz) token grid -> (1 [+ 1] + gx*gy*gz, dim) float32.

    Each axis gets an even share of ``dim`` (``2 * (dim // 6)``); a remainder of fewer than 6 channels stays 0,
    so any width works while widths divisible by 6 (192, 384, 768) use every channel. The CLS row is zero.
    """
    if dim < 6:
        raise ValueError(f"a 3D sin-cos embedding needs a width >= 6, got {dim}")
    per_axis = 2 * (dim // 6)
    axes = [torch.arange(g, dtype=torch.float64) for g in grid]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")  # "ij": x varies slowest, as Conv3d flattens
    table = torch.cat([sincos_1d(per_axis, g.reshape(-1)) for g in (gx, gy, gz)], dim=1)
    table = F.pad(table, (0, dim - 3 * per_axis))
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int], n_prefix: int = 1
) -> torch.Tensor:
    """Resample a (1 + N_old, D) or (B, n_prefix + N_old, D) table to a new token grid (trilinear).

    Prefix rows (CLS) are kept as they are. Used when a model meets a volume whose grid differs from the one it
    was built for (a larger field of view, or a finer patch grid).
    """
    squeeze = pos_embed.dim() == 2
    table = pos_embed[None] if squeeze else pos_embed
    prefix, patches = table[:, :n_prefix], table[:, n_prefix:]
    n_old = old_grid[0] * old_grid[1] * old_grid[2]
    if patches.shape[1] != n_old:
        raise ValueError(f"table has {patches.shape[1]} patch rows but grid {list(old_grid)} has {n_old}")
    if tuple(old_grid) != tuple(new_grid):
        b, _, d = patches.shape
        vol = patches.reshape(b, *old_grid, d).permute(0, 4, 1, 2, 3)  # (B, D, gx, gy, gz)
        vol = F.interpolate(vol.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
        patches = vol.permute(0, 2, 3, 4, 1).reshape(b, -1, d).to(table.dtype)
    out = torch.cat([prefix, patches], dim=1)
    return out[0] if squeeze else out
