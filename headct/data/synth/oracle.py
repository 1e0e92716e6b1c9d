"""The ORACLE feature: how many voxels of the store's grid a study's lesions visibly change.

Raw lesion volume would separate positives from negatives perfectly by construction, so it says nothing about
what an encoder can see. The oracle instead follows each lesion through the imaging chain the store's volumes
went through, without noise:
1. its own HU change on the 1.5 mm phantom (painted minus unpainted, recorded while painting: exact, and
   without the mass-effect displacement, which is anatomy moving rather than lesion);
2. the same linear blur as the reconstruction of the series ingest selects (in-plane PSF and pixel
   integration, the slice-sensitivity profile of its thickness, bone-kernel sharpening): `scanner.blur`;
3. trilinear sampling onto a regular grid of the store's spacing, as ingest resamples (phase fixed at the
   series' first pixel: ingest centres its grid on the head, which shifts counts by sampling noise only).
A grid voxel is visible when that noise-free change reaches VISIBLE_SD times the series' noise SD in the
brain. Per study and group (each finding kind; all bleeds; both fracture kinds) the count of visible voxels is
the oracle score; its AUROC per label and severity stratum measures what is visible at the grid at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from headct.data.synth import scanner
from headct.data.synth.anatomy import Grid
from headct.data.synth.truth import BLEEDS, FRACTURES, ORACLE_GROUPS, ORACLE_SPACINGS_MM, VISIBLE_SD


@dataclass(frozen=True)
class Painted:
    """One finding as painted: its kind, painted volume (mL) and HU change (phantom HU) on a sub-box."""

    kind: str
    volume_ml: float
    box: tuple[slice, slice, slice]  # index box of `delta` in the phantom grid
    delta: np.ndarray  # (bx, by, bz) float32 painted minus unpainted HU; all zero if nothing was painted


def crop_change(before: np.ndarray, after: np.ndarray) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """The smallest index box holding every voxel that changed, and the change inside it."""
    changed = before != after
    if not changed.any():
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), np.float32)  # type: ignore[return-value]
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(changed))
    return box, (after[box] - before[box]).astype(np.float32)  # type: ignore[return-value]


def groups_of(kind: str) -> tuple[str, ...]:
    return (kind, *(("bleed",) if kind in BLEEDS else ()), *(("fracture",) if kind in FRACTURES else ()))


def series_change(painted: Painted, grid: Grid, recon: scanner.Reconstruction, z_centres: np.ndarray,
                  matrix: int, pixel_mm: float) -> tuple[np.ndarray, slice, slice]:
    """The noise-free HU change the finding makes in the reconstructed series, over the image window its box
    reaches: (n, rows, cols) and the row and column slices of the (n, matrix, matrix) series."""
    origin = grid.origin + grid.spacing * np.array([s.start for s in painted.box], float)
    sub = Grid(origin=origin, shape=painted.delta.shape, spacing=grid.spacing)  # type: ignore[arg-type]
    image, rows, cols = scanner.blur_window(painted.delta, sub, recon, z_centres, matrix, pixel_mm)
    return scanner.sharpen(image, recon), rows, cols


def count_visible(change: np.ndarray, threshold: float, spacings_mm: tuple[float, ...], pixel_mm: float,
                  slice_step_mm: float) -> dict[float, int]:
    """Per spacing: grid points (that far apart) where the trilinear interpolation of `change` (n, rows, cols)
    reaches `threshold` in magnitude. Only the box around the above-threshold samples is looked at: an
    interpolated value can reach the threshold only next to a sample that does."""
    strong = np.abs(change) >= threshold
    spans = []
    for axis in range(3):
        hit = np.flatnonzero(strong.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return dict.fromkeys(spacings_mm, 0)
        spans.append((max(int(hit[0]) - 1, 0), int(hit[-1]) + 1))
    counts = {}
    for spacing in spacings_mm:
        steps = (spacing / slice_step_mm, spacing / pixel_mm, spacing / pixel_mm)  # grid step in sample units
        axes = [np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step
                for (lo, hi), step in zip(spans, steps, strict=True)]
        points = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        values = ndi.map_coordinates(change, points, order=1, mode="constant", cval=0.0)
        counts[spacing] = int((np.abs(values) >= threshold).sum())
    return counts


def visible_voxels(painted: list[Painted], grid: Grid, recon: scanner.Reconstruction, z_centres: np.ndarray,
                   matrix: int, pixel_mm: float) -> dict[tuple[str, float], int]:
    """(group, spacing mm) -> visible voxels, for every ORACLE_GROUPS x ORACLE_SPACINGS_MM (0 where absent)."""
    changes: dict[str, np.ndarray] = {}
    for item in painted:
        if not item.delta.size:
            continue
        image, rows, cols = series_change(item, grid, recon, z_centres, matrix, pixel_mm)
        for group in groups_of(item.kind):
            if group not in changes:
                changes[group] = np.zeros((len(z_centres), matrix, matrix), np.float32)
            changes[group][:, rows, cols] += image
    threshold = VISIBLE_SD * recon.noise_hu
    step = float(np.diff(z_centres).mean()) if len(z_centres) > 1 else recon.spacing_mm
    out = {}
    for group in ORACLE_GROUPS:
        counts = (count_visible(changes[group], threshold, ORACLE_SPACINGS_MM, pixel_mm, step) if group in changes
                  else dict.fromkeys(ORACLE_SPACINGS_MM, 0))
        out.update({(group, spacing): n for spacing, n in counts.items()})
    return out
