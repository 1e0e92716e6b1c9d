"""Batched DINO multi-crop of HU volumes on the training device, taken inside the head.

Recipe (Caron et al. 2021, in 3D): each volume gives ``n_global`` large views and ``n_local`` small ones. A view
is a random axis-aligned box, resampled trilinearly to a fixed output grid, then flipped left-right and
intensity-jittered on its own (``headct.data.augment.augment_hu``). Local views are output on a SMALLER grid than
global ones (the ViT interpolates its position table), not stretched to the global size as in the seed.

Units and conventions:
- Volumes are (B, X, Y, Z) HU, int16 or float, RAS+ (axis 0 is x, left -> right); air is about -1000 HU.
- Output sizes are in voxels of the crop grid and must be multiples of the ViT patch size.
- ``*_scale`` is the fraction of the volume's voxel count a crop box covers (DINO's "area" scale, in 3D);
  each box edge is ``volume edge * scale**(1/3) * aspect factor``, capped at the volume edge.
- Box coordinates are continuous voxel coordinates: voxel i covers [i, i + 1), so a whole axis is [0, X].

Crops are taken inside the head: each box centre is drawn uniformly inside the volume's head bounding box
(voxels above ``threshold_hu``), restricted so the box stays inside the volume where possible. The seed cut its
crops from a zero-padded canvas, so many views were mostly padding (and 0 HU padding is not even air).

Speed: one ``grid_sample`` call per crop size for the whole batch (all crops of one size are stacked along the
first output axis of one sampling grid), so it runs as a handful of kernels on a GPU.
Randomness: every draw is made on the caller's CPU generator in a fixed order, so a step-seeded generator
(``headct.train.engine.step_generator``) gives the same crops on any device and after a resume.
Import-light: torch only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from headct.data.augment import augment_hu

Size3 = tuple[int, int, int]


class MultiCrop(NamedTuple):
    """The views of one batch: lists of (B, X', Y', Z') float32 HU tensors, and the boxes they came from.

    Boxes are (B, 2, 3) float32 continuous voxel coordinates of the source volume: [:, 0] the low corner,
    [:, 1] the high corner (before the left-right flip, which mirrors the crop's content, not its box).
    """

    global_crops: list[torch.Tensor]
    local_crops: list[torch.Tensor]
    global_boxes: list[torch.Tensor]
    local_boxes: list[torch.Tensor]


def _size3(size: int | tuple[int, ...] | list[int]) -> Size3:
    if isinstance(size, int):
        return (size, size, size)
    if len(size) != 3:
        raise ValueError(f"expected one int or three, got {size!r}")
    return (int(size[0]), int(size[1]), int(size[2]))


def head_boxes(hu: torch.Tensor, threshold_hu: float = -300.0) -> torch.Tensor:
    """(B, X, Y, Z) HU -> (B, 2, 3) int64 bounding boxes of the voxels above ``threshold_hu``.

    [:, 0] is the first head voxel index per axis, [:, 1] one past the last (so the box is [lo, hi) in voxel
    indices, [lo, hi] in continuous coordinates). The default -300 HU sits between air (-1000) and fat/soft
    tissue (-100..80), so it finds skin, not air padding or noise. A volume with no voxel above the threshold gets
    the whole volume as its box (a blank volume should have been rejected at ingest; crops stay well-defined).
    """
    if hu.dim() != 4:
        raise ValueError(f"expected a (B, X, Y, Z) HU batch, got shape {list(hu.shape)}")
    head = hu > threshold_hu
    lows, highs = [], []
    for axis in (1, 2, 3):
        others = tuple(a for a in (1, 2, 3) if a != axis)
        present = head.any(dim=others)  # (B, S): does this slice hold any head voxel?
        size = present.shape[1]
        index = torch.arange(size, device=hu.device)
        # first / last present slice by masked min / max (no host sync, unlike nonzero)
        lo = torch.where(present, index, size).amin(dim=1)
        hi = torch.where(present, index + 1, 0).amax(dim=1)
        empty = lo >= hi
        lows.append(torch.where(empty, 0, lo))
        highs.append(torch.where(empty, size, hi))
    return torch.stack([torch.stack(lows, dim=1), torch.stack(highs, dim=1)], dim=1)


def _draw_boxes(
    heads: torch.Tensor,
    volume: Size3,
    count: int,
    scale: tuple[float, float],
    aspect: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``count`` random boxes per volume -> (count, B, 2, 3) float32 continuous voxel coordinates.

    Draws (on the CPU generator, in this order): volume fraction, per-axis log-aspect, centre position.
    """
    b = heads.shape[0]
    lo_s, hi_s = scale
    fraction = lo_s + (hi_s - lo_s) * torch.rand(count, b, 1, generator=generator)
    log_aspect = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(
        count, b, 3, generator=generator
    )
    # Centre the log-aspects so the three factors multiply to 1 and the volume fraction is kept.
    log_aspect = log_aspect - log_aspect.mean(dim=2, keepdim=True)
    where = torch.rand(count, b, 3, generator=generator)

    device = heads.device
    vol = torch.tensor(volume, dtype=torch.float32, device=device)
    extent = vol * fraction.to(device) ** (1.0 / 3.0) * log_aspect.to(device).exp()
    extent = torch.minimum(extent, vol)  # (count, B, 3)
    half = extent / 2
    head_lo, head_hi = heads[:, 0].float(), heads[:, 1].float()  # (B, 3)
    # Centres inside the head box AND far enough from the volume edge for the box to fit inside the volume.
    c_lo = torch.maximum(head_lo, half)
    c_hi = torch.minimum(head_hi, vol - half)
    # If the two do not meet (a box larger than the head, head against the edge), take the fitting centre
    # nearest to the head's centre: the box then still covers the head's side of the volume.
    nearest = torch.minimum(torch.maximum((head_lo + head_hi) / 2, half), vol - half)
    stuck = c_lo > c_hi
    c_lo = torch.where(stuck, nearest, c_lo)
    c_hi = torch.where(stuck, nearest, c_hi)
    centre = c_lo + where.to(device) * (c_hi - c_lo)
    return torch.stack([centre - half, centre + half], dim=2)


def _sampling_grid(boxes: torch.Tensor, volume: Size3, out: Size3) -> torch.Tensor:
    """(count, B, 2, 3) boxes -> (B, count * X', Y', Z', 3) grid_sample grid, crops stacked along axis 0.

    Output voxel j of an axis samples the box at lo + (j + 0.5) * extent / n (voxel centres), in
    grid_sample's align_corners=False coordinates: -1 and +1 are the outer faces of the volume.
    grid[..., 0] indexes the input's last axis (z), [..., 1] y, [..., 2] x.
    """
    count, b = boxes.shape[:2]
    axes = []
    for k in range(3):
        steps = (torch.arange(out[k], device=boxes.device, dtype=torch.float32) + 0.5) / out[k]  # (n,)
        lo, hi = boxes[:, :, 0, k, None], boxes[:, :, 1, k, None]  # (count, B, 1)
        axes.append(2 * (lo + (hi - lo) * steps) / volume[k] - 1)  # (count, B, n)
    gx = axes[0].permute(1, 0, 2).reshape(b, count * out[0], 1, 1)
    # y and z vary per crop, not along axis 0 within a crop: repeat each crop's row over its X' slices.
    gy = axes[1][:, None].expand(count, out[0], b, out[1]).permute(2, 0, 1, 3).reshape(b, count * out[0], out[1], 1)
    gz = axes[2][:, None].expand(count, out[0], b, out[2]).permute(2, 0, 1, 3).reshape(b, count * out[0], 1, out[2])
    shape = (b, count * out[0], out[1], out[2])
    return torch.stack([gz.expand(shape), gy.expand(shape), gx.expand(shape)], dim=-1)


def _crop_group(
    volumes: torch.Tensor,
    heads: torch.Tensor,
    generator: torch.Generator,
    count: int,
    out: Size3,
    scale: tuple[float, float],
    aspect: tuple[float, float],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` crops of one output size for every volume: one grid_sample call for all of them."""
    if count == 0:
        return [], []
    volume = _size3(tuple(volumes.shape[2:]))
    boxes = _draw_boxes(heads, volume, count, scale, aspect, generator)
    grid = _sampling_grid(boxes, volume, out)
    # padding "border": samples within half a voxel of a face interpolate towards the edge voxel (air in a
    # canonical volume), never towards 0 HU as zero padding would.
    sampled = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="border", align_corners=False)
    crops = list(sampled[:, 0].split(out[0], dim=1))  # count x (B, X', Y', Z')
    return crops, list(boxes.unbind(0))


def multi_crop(
    hu: torch.Tensor,
    generator: torch.Generator,
    n_global: int = 2,
    global_size: int | Size3 = 64,
    n_local: int = 4,
    local_size: int | Size3 = 32,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
    threshold_hu: float = -300.0,
    flip_lr: bool = True,
    jitter_hu: float = 0.0,
    jitter_scale: float = 0.0,
    patch_size: int | None = None,
) -> MultiCrop:
    """(B, X, Y, Z) HU batch on the training device -> DINO views (float32 HU, same device).

    Args:
        hu: canonical volumes, int16 or float HU.
        generator: CPU generator seeded from the global step; all draws come from it.
        n_global, global_size: number of global views per volume and their output grid (voxels).
        n_local, local_size: number of local views and their (smaller) output grid (voxels).
        global_scale, local_scale: (min, max) fraction of the volume's voxel count a box covers.
        aspect: (min, max) per-axis stretch of a box edge (their product is kept at 1).
        threshold_hu: HU above which a voxel counts as head, for the box centres.
        flip_lr, jitter_hu, jitter_scale: per-view augmentation, as in ``augment_hu``.
        patch_size: if given, output sizes must be multiples of it (checked here, not deep in the ViT).

    The draw order is fixed (global boxes, local boxes, then per-view augmentation, globals first), so
    changing ``n_local`` does not change the global views of a step.
    """
    if hu.dim() != 4:
        raise ValueError(f"expected a (B, X, Y, Z) HU batch, got shape {list(hu.shape)}")
    g_size, l_size = _size3(global_size), _size3(local_size)
    if patch_size is not None:
        for name, size in (("global_size", g_size), ("local_size", l_size)):
            if any(s % patch_size for s in size):
                raise ValueError(f"{name} {list(size)} is not a multiple of the patch size {patch_size}")
    for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
    if not 0.0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must satisfy 0 < min <= max, got {aspect}")
    if n_global < 1 or n_local < 0:
        raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")

    heads = head_boxes(hu, threshold_hu)
    volumes = hu[:, None].float()  # (B, 1, X, Y, Z): grid_sample needs a channel axis and floats
    global_crops, global_boxes = _crop_group(volumes, heads, generator, n_global, g_size, global_scale, aspect)
    local_crops, local_boxes = _crop_group(volumes, heads, generator, n_local, l_size, local_scale, aspect)
    augment = {"flip_lr": flip_lr, "jitter_hu": jitter_hu, "jitter_scale": jitter_scale}
    return MultiCrop(
        global_crops=[augment_hu(c, generator, **augment) for c in global_crops],
        local_crops=[augment_hu(c, generator, **augment) for c in local_crops],
        global_boxes=global_boxes,
        local_boxes=local_boxes,
    )
