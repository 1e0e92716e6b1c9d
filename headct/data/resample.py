"""Head localisation and trilinear resampling of a source stack onto the canonical RAS grid.

Canonical volume (DESIGN.md): array axes (x, y, z) = RAS+, i.e. x index grows toward the patient's Right,
y toward Anterior, z toward Superior (nibabel.aff2axcodes(affine) == ('R', 'A', 'S')). The grid has
`spec.shape` voxels; with `fit="isotropic"` they are `spec.spacing_mm` apart and centred on the head's bounding
box; with `fit="stretch"` (the seed's recipe, explicit opt-in) the bounding box is resized to `shape`, so the
spacing differs per axis and anatomy is distorted. Outside the scanned field: `spec.pad_hu` (air, never 0).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from headct.config.base import PreprocessSpec
from headct.data.series import LPS_TO_RAS, StackGeometry
from headct.errors import InputError

HEAD_THRESHOLD_HU = -500.0  # skin, brain and bone lie above; air and most foam head rests below
_LOCALISE_MM = 2.0  # in-plane sampling used to find the head (speed; the box needs no finer detail)
_INT16 = np.iinfo(np.int16)
CHUNK_VOXELS = 1 << 19  # output points resampled at once: ~150 bytes of float64 scratch each, ~80 MB


class NoHeadError(InputError):
    """No voxel above the head threshold: there is nothing to centre the grid on."""


def _box_of_voxels(geometry: StackGeometry, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS (min, max) corners of the source-voxel box [lo, hi] given as (col, row, k) integers."""
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), float)
    ras = geometry.ras_of_voxels(corners)
    return ras.min(axis=0), ras.max(axis=0)


def head_box_ras(hu: np.ndarray, geometry: StackGeometry, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) RAS mm of the head's bounding box in the source stack `hu` (N, rows, cols).

    "threshold": voxels above -500 HU, opened in-plane (about 6 mm wide structuring element) so thin links
    to the table or head holder break, then the largest 3D connected component. "none": the whole stack.
    """
    n, rows, cols = hu.shape
    if mode == "none":
        return _box_of_voxels(geometry, np.array([0, 0, 0]), np.array([cols - 1, rows - 1, n - 1]))
    step = max(1, int(round(_LOCALISE_MM / min(geometry.pixel_spacing))))
    row0, col0 = _phase(geometry, geometry.col_dir, 0, step), _phase(geometry, geometry.row_dir, 1, step)
    mask = _open_in_plane(hu[:, row0::step, col0::step] > HEAD_THRESHOLD_HU)
    labels, count = ndimage.label(mask)
    if count == 0:
        raise NoHeadError(f"no voxel above {HEAD_THRESHOLD_HU:.0f} HU after opening")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    head = labels == int(sizes.argmax())  # the largest component (the first of equal ones)
    ks, rs, cs = (np.flatnonzero(head.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    lo = np.array([col0 + cs[0] * step, row0 + rs[0] * step, ks[0]])
    hi = np.array([col0 + cs[-1] * step, row0 + rs[-1] * step, ks[-1]])
    return _box_of_voxels(geometry, lo, hi)


def _open_in_plane(mask: np.ndarray) -> np.ndarray:
    """Binary opening of each plane of `mask` (N, rows, cols) by a 3 x 3 square, outside the array counting as
    background: what `ndimage.binary_opening(mask, np.ones((1, 3, 3)))` gives (a square's erosion and dilation are
    each a row pass and a column pass), in a few whole-array logical operations instead of 9 x 2 per voxel."""
    row_pass = np.zeros_like(mask)  # eroded along the columns: a pixel and both its neighbours in the row
    np.logical_and(mask[:, :, :-2], mask[:, :, 1:-1], out=row_pass[:, :, 1:-1])
    row_pass[:, :, 1:-1] &= mask[:, :, 2:]
    eroded = np.zeros_like(mask)
    np.logical_and(row_pass[:, :-2], row_pass[:, 1:-1], out=eroded[:, 1:-1])
    eroded[:, 1:-1] &= row_pass[:, 2:]
    grown = eroded.copy()
    grown[:, :, 1:] |= eroded[:, :, :-1]
    grown[:, :, :-1] |= eroded[:, :, 1:]
    opened = grown.copy()
    opened[:, 1:] |= grown[:, :-1]
    opened[:, :-1] |= grown[:, 1:]
    return opened


def _phase(geometry: StackGeometry, direction: np.ndarray, spacing_index: int, step: int) -> int:
    """First index of the in-plane subsample along `direction`, anchored in patient space: the pixels kept are
    those whose coordinate along the sign-normalised axis (largest component positive) is a multiple of `step`
    pixels from the world origin. So the same scan stored in any axis order or direction (a DICOM series, its NIfTI
    conversion reoriented to RAS) subsamples the same physical pixels, finds the same head box and lands on the same
    grid. A pixel exactly half-way between two world positions (a centred field of view) is rounded up (toward the
    positive axis) from either end."""
    if step == 1:
        return 0
    sign = 1 if direction[int(np.argmax(np.abs(direction)))] > 0 else -1
    start = float(geometry.positions[0] @ (sign * direction)) / geometry.pixel_spacing[spacing_index]
    # world index of pixel 0 (index i is anchor + sign * i); the 1e-3 pixel margin absorbs the rounding of
    # PixelSpacing/ImagePositionPatient in DICOM's decimal strings (measured: 3e-6 pixel on a 256-pixel row)
    anchor = int(np.floor(start + 0.5 + 1e-3))
    return int((-sign * anchor) % step)


def canonical_affine(spec: PreprocessSpec, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """4x4 canonical voxel index (x, y, z) -> RAS mm, diagonal and positive (RAS+), centred on the box."""
    shape = np.asarray(spec.shape, float)
    # stretch: voxel centres span the box; a flat box axis still gets a usable spacing
    stretched = np.maximum((hi - lo) / shape, 1e-3)
    spacing = np.full(3, spec.spacing_mm) if spec.fit == "isotropic" else stretched
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (lo + hi) / 2 - spacing * (shape - 1) / 2
    return affine


def resample(hu: np.ndarray, geometry: StackGeometry, affine: np.ndarray, shape: tuple[int, int, int],
             pad_hu: float, chunk_voxels: int = CHUNK_VOXELS) -> np.ndarray:
    """Trilinear samples (float32, shape (X, Y, Z)) of the source stack `hu` (N, rows, cols) at the centres of
    the canonical voxels whose index -> RAS map is `affine`.

    Every output point is placed in the source by the true slice positions (`StackGeometry.source_coords`), so
    gantry tilt, uneven spacing and oblique slices are resampled in patient space, not assumed away. The output is
    filled in slabs of whole z planes holding at most `chunk_voxels` points, so the coordinate arrays stay small
    (about 150 bytes per point, ~80 MB per slab) whatever the grid. scipy samples the float32 stack in place
    (order 1 needs no spline prefilter, hence no float64 copy). Points outside the source stack get `pad_hu`; the
    "constant" mode does not blend the scanned border with the pad value. A stack whose rows and columns run
    along patient axes (most series) gets the same samples from separable coordinates (`_resample_axis_aligned`).
    """
    linear = affine[:3, :3]
    if (all(_signed_axis(v) for v in (geometry.row_dir, geometry.col_dir, geometry.normal))
            and not np.any(linear - np.diag(np.diag(linear)))):
        return _resample_axis_aligned(hu, geometry, affine, shape, pad_hu)
    return _resample_general(hu, geometry, affine, shape, pad_hu, chunk_voxels)


def _resample_general(hu: np.ndarray, geometry: StackGeometry, affine: np.ndarray, shape: tuple[int, int, int],
                      pad_hu: float, chunk_voxels: int = CHUNK_VOXELS) -> np.ndarray:
    """`resample` for any geometry: every output point's source coordinates computed in full."""
    nx, ny, nz = shape
    out = np.empty(shape, np.float32)
    ii, jj = (a.ravel().astype(np.float64) for a in np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij"))
    per_plane = nx * ny
    step = max(1, chunk_voxels // per_plane)
    flip = LPS_TO_RAS.diagonal()[:3]
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        kk = np.repeat(np.arange(z0, z1, dtype=np.float64), per_plane)
        index = np.stack([np.tile(ii, z1 - z0), np.tile(jj, z1 - z0), kk], axis=1)  # (M, 3) voxel (x, y, z)
        lps = (index @ affine[:3, :3].T + affine[:3, 3]) * flip  # RAS -> LPS
        coords = geometry.source_coords(lps)
        values = ndimage.map_coordinates(hu, coords, order=1, mode="constant", cval=pad_hu, output=np.float32,
                                         prefilter=False)
        # points are laid out plane by plane, and within a plane x-major (y fastest)
        out[:, :, z0:z1] = values.reshape(z1 - z0, nx, ny).transpose(1, 2, 0)
    return out


def _signed_axis(v: np.ndarray) -> tuple[int, float] | None:
    """(axis, sign) of a vector that is exactly +-1 along one axis and 0 along the others, else None."""
    nonzero = np.flatnonzero(v)
    return (int(nonzero[0]), float(v[nonzero[0]])) if len(nonzero) == 1 and abs(v[nonzero[0]]) == 1.0 else None


def _resample_axis_aligned(hu: np.ndarray, geometry: StackGeometry, affine: np.ndarray,
                           shape: tuple[int, int, int], pad_hu: float) -> np.ndarray:
    """`resample` for a stack whose rows and columns run exactly along patient axes (the usual axial series),
    with the same numbers, computed separably.

    The canonical affine is diagonal, so a point's LPS coordinate along axis d depends on its grid index along d
    alone; with row, column and normal directions that are +-1 along one axis, every dot product of
    `StackGeometry.source_coords` picks one coordinate (times +-1, plus exact zeros), so the fractional slice k
    and the slice origin depend on the grid index along the normal's axis only, the row on that index and the
    column-direction axis, the column on it and the row-direction axis. The same float64 operations are applied
    to these 1-D and 2-D tables as `resample` applies point by point, so the coordinates are the same numbers (up
    to the sign of a zero, which moves no sample) and map_coordinates samples the same values. Planes beyond the
    first or last slice (k = -2) are the pad value, as map_coordinates' constant mode gives them; the others are
    sampled one plane at a time, the column index varying fastest (neighbouring points read neighbouring bytes).
    """
    (n_axis, n_sign), (c_axis, c_sign), (r_axis, r_sign) = (_signed_axis(v) for v in (
        geometry.normal, geometry.col_dir, geometry.row_dir))
    flip = LPS_TO_RAS.diagonal()[:3]
    lps = [(np.arange(n, dtype=np.float64) * affine[d, d] + affine[d, 3]) * flip[d] for d, n in enumerate(shape)]
    n = geometry.n_slices
    height = lps[n_axis] * n_sign
    k = np.interp(height, geometry.along, np.arange(n, dtype=float))
    k[(height < geometry.along[0] - 1e-6) | (height > geometry.along[-1] + 1e-6)] = -2.0
    inside = np.clip(k, 0, n - 1)
    origin = np.stack([np.interp(inside, np.arange(n), geometry.positions[:, d]) for d in range(3)], axis=1)
    rs, cs = geometry.pixel_spacing
    rows = (lps[c_axis][:, None] - origin[None, :, c_axis]) * c_sign / rs  # (grid along the column axis, planes)
    cols = (lps[r_axis][:, None] - origin[None, :, r_axis]) * r_sign / cs  # (grid along the row axis, planes)
    out = np.full(shape, np.float32(pad_hu), np.float32)
    to_grid = np.argsort((n_axis, c_axis, r_axis))  # (plane, row axis, column axis) -> (x, y, z)
    coords = np.empty((3, shape[c_axis], shape[r_axis]))
    for plane in np.flatnonzero(k != -2.0):
        coords[0] = k[plane]
        coords[1] = rows[:, plane, None]
        coords[2] = cols[None, :, plane]
        values = ndimage.map_coordinates(hu, coords.reshape(3, -1), order=1, mode="constant", cval=pad_hu,
                                         output=np.float32, prefilter=False)
        where = tuple(plane if d == n_axis else slice(None) for d in range(3))
        out[where] = values.reshape(1, *coords.shape[1:]).transpose(to_grid).squeeze(axis=n_axis)
    return out


def cropped_mm(lo: np.ndarray, hi: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Per RAS axis (x, y, z), mm of the head box [lo, hi] that lies outside the canonical grid (its field of view,
    voxel edge to voxel edge: shape x spacing). 0 where the head fits; with `fit: isotropic` the grid is centred
    on the box, so this is the head's length beyond the field of view, shared between both ends."""
    spacing = np.diag(affine)[:3]
    first = affine[:3, 3] - spacing / 2
    last = affine[:3, 3] + spacing * (np.asarray(shape, float) - 0.5)
    return np.maximum(first - lo, 0.0) + np.maximum(hi - last, 0.0)


def to_canonical(hu: np.ndarray, geometry: StackGeometry, spec: PreprocessSpec
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source HU stack (N, rows, cols) float32 -> (canonical int16 HU volume (X, Y, Z), 4x4 RAS affine, mm of the
    head cropped by the grid per axis (`cropped_mm`)).

    The cropped extent is measured on the head box (threshold localisation) whatever `head_localisation` says: with
    "none" the grid is centred on the whole stack, and the head may still stick out of it (no head: nothing
    cropped)."""
    lo_hu, hi_hu = spec.clip_hu
    if lo_hu < _INT16.min or hi_hu > _INT16.max or lo_hu >= hi_hu:
        raise InputError(f"preprocess.clip_hu={list(spec.clip_hu)} must be increasing and within int16")
    lo, hi = head_box_ras(hu, geometry, spec.head_localisation)
    affine = canonical_affine(spec, lo, hi)
    if spec.head_localisation == "threshold":
        crop = cropped_mm(lo, hi, affine, spec.shape)
    else:
        try:
            crop = cropped_mm(*head_box_ras(hu, geometry, "threshold"), affine, spec.shape)
        except NoHeadError:
            crop = np.zeros(3)
    volume = resample(hu, geometry, affine, spec.shape, float(spec.pad_hu))
    np.clip(volume, lo_hu, hi_hu, out=volume)
    return np.rint(volume).astype(np.int16), affine, crop
