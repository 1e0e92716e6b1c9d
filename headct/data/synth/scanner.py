"""Scanner model: the phantom (1.5 mm grid, HU) -> reconstructed CT slices as a real scanner would deliver them.

Per series: in-plane point-spread function and pixel integration, slice-sensitivity profile (slab averaging:
partial volume at 5 mm), kernel sharpening for bone reconstructions, correlated noise (white Gaussian noise
filtered in-plane, stronger in the skull base), beam-hardening streaks between dense bones (look-alikes), and
quantisation to the 12-bit HU range. All resampling is separable: three matrix products per series.

Frames: the phantom is patient RAS; DICOM is LPS (+x = patient left, +y = posterior, +z = superior).
Image pixel (row r, column c) of slice k sits at LPS (x0 + c * d, y0 + r * d, z_k): columns run towards the
patient's left, rows towards the back (ImageOrientationPatient 1\\0\\0\\0\\1\\0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from headct.data.synth.anatomy import FOV_CENTRE_Y, Grid

HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Reconstruction:
    """One series' reconstruction: slab geometry, kernel and noise (mm, HU)."""

    thickness_mm: float
    spacing_mm: float  # between slice centres
    psf_mm: float  # Gaussian sigma of the in-plane point-spread function
    noise_hu: float  # noise SD in the brain of a supratentorial slice
    noise_grain_px: float  # correlation length of the noise (larger for soft kernels)
    sharpen: float  # unsharp-mask gain of bone kernels (edge overshoot); 0 for soft kernels
    streak_hu: float  # amplitude of beam-hardening streaks in the skull base


@dataclass(frozen=True)
class SliceStack:
    """Reconstructed slices (n, rows, cols) float32 HU with their LPS geometry."""

    hu: np.ndarray
    positions: np.ndarray  # (n, 3) LPS mm of pixel (0, 0) of each slice, in stack order (inferior first)
    pixel_mm: float
    thickness_mm: float
    spacing_mm: float


def patient_to_lps(p: np.ndarray, table_z: float) -> np.ndarray:
    """Patient RAS mm (..., 3) -> DICOM LPS mm: flip x and y, centre the field of view, add the table offset."""
    p = np.asarray(p, float)
    return np.stack([-p[..., 0], -(p[..., 1] - FOV_CENTRE_Y), p[..., 2] + table_z], axis=-1)


def _kernel_table(sigma_mm: float, box_mm: float, grid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """1D weights of a phantom plane at offset delta: linear interpolation (tent) * Gaussian * box.

    The tent has unit peak and the blur integrates to one, so weights over all planes sum to exactly 1.
    """
    step = 0.02
    reach = grid_mm + box_mm / 2 + 4 * sigma_mm + step
    s = np.arange(-reach, reach + step / 2, step)
    blur = np.exp(-0.5 * (s / max(sigma_mm, 1e-3)) ** 2) if sigma_mm > 0.01 else (np.abs(s) < step / 2) * 1.0
    if box_mm > step:
        box = (np.abs(s) <= box_mm / 2).astype(float)
        blur = np.convolve(blur, box, mode="same")
    blur /= blur.sum()
    tent = np.clip(1.0 - np.abs(s) / grid_mm, 0.0, None)
    return s, np.convolve(tent, blur, mode="same")


def _weights(out_mm: np.ndarray, grid_axis: np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(n_out, n_grid) resampling matrix from phantom planes to output sample positions."""
    s, k = table
    return np.interp(out_mm[:, None] - grid_axis[None, :].astype(float), s, k, left=0.0, right=0.0)


def slice_centres(z_lo: float, z_hi: float, spacing: float) -> np.ndarray:
    """Patient z (mm) of contiguous slices covering [z_lo, z_hi], inferior first."""
    n = max(1, int(np.ceil((z_hi - z_lo) / spacing - 1e-6)))
    return z_lo + spacing * (np.arange(n) + 0.5)


def reconstruct(phantom: np.ndarray, grid: Grid, recon: Reconstruction, z_centres: np.ndarray, matrix: int,
                pixel_mm: float, table_z: float, rng: np.random.Generator) -> SliceStack:
    """Phantom (nx, ny, nz) HU -> slices (n, matrix, matrix) HU, with blur, partial volume, noise, streaks."""
    shifted = phantom + np.float32(1000.0)  # air -> 0, so everything outside the phantom box reads as air
    img = sharpen(blur(shifted, grid, recon, z_centres, matrix, pixel_mm) - np.float32(1000.0), recon)
    col_x, row_y = _pixel_axes(matrix, pixel_mm)
    bone = _bone_fraction(img)
    _add_streaks(img, bone, recon.streak_hu, rng)
    _add_noise(img, bone, recon, rng)
    np.clip(np.rint(img, out=img), HU_MIN, HU_MAX, out=img)
    p0 = np.stack([np.full_like(z_centres, col_x[0]), np.full_like(z_centres, row_y[0]), z_centres], axis=1)
    return SliceStack(hu=img, positions=patient_to_lps(p0, table_z), pixel_mm=pixel_mm,
                      thickness_mm=recon.thickness_mm, spacing_mm=float(np.diff(z_centres).mean())
                      if len(z_centres) > 1 else recon.thickness_mm)


def _pixel_axes(matrix: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Patient RAS x of each image column and y of each image row (mm)."""
    half = matrix * pixel_mm / 2.0
    centres = (np.arange(matrix) + 0.5) * pixel_mm - half  # LPS offset of each pixel centre from the FOV centre
    return -centres, FOV_CENTRE_Y - centres  # columns run towards patient left (-x RAS), rows posteriorly (-y)


def _blur_weights(grid: Grid, recon: Reconstruction, z_centres: np.ndarray, matrix: int, pixel_mm: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Separable resampling matrices phantom -> image: columns (matrix, nx), rows (matrix, ny), slices (n, nz)."""
    col_x, row_y = _pixel_axes(matrix, pixel_mm)
    inplane = _kernel_table(recon.psf_mm, pixel_mm, grid.spacing)
    wx = _weights(col_x, grid.axis(0), inplane).astype(np.float32)
    wy = _weights(row_y, grid.axis(1), inplane).astype(np.float32)
    wz = _weights(z_centres, grid.axis(2), _kernel_table(0.12 * recon.thickness_mm, recon.thickness_mm,
                                                         grid.spacing)).astype(np.float32)
    return wx, wy, wz


def _apply(phantom: np.ndarray, wx: np.ndarray, wy: np.ndarray, wz: np.ndarray) -> np.ndarray:
    img = np.tensordot(phantom, wz, (2, 1))  # (nx, ny, n)
    img = np.tensordot(wy, img, (1, 1))  # (rows, nx, n)
    img = np.tensordot(wx, img, (1, 1))  # (cols, rows, n)
    return np.ascontiguousarray(img.transpose(2, 1, 0))  # (n, rows, cols)


def blur(phantom: np.ndarray, grid: Grid, recon: Reconstruction, z_centres: np.ndarray, matrix: int,
         pixel_mm: float) -> np.ndarray:
    """The blur of a reconstruction: (nx, ny, nz) on `grid` -> (n, matrix, matrix) slices (in-plane PSF and
    pixel integration, slice-sensitivity profile). Linear and zero outside `grid`, so a lesion's HU change on a
    sub-grid, blurred then `sharpen`ed, is exactly its contribution to the noise-free image."""
    return _apply(phantom, *_blur_weights(grid, recon, z_centres, matrix, pixel_mm))


def blur_window(phantom: np.ndarray, grid: Grid, recon: Reconstruction, z_centres: np.ndarray, matrix: int,
                pixel_mm: float, pad_px: int = 6) -> tuple[np.ndarray, slice, slice]:
    """`blur` computed only over the image rows and columns `grid` reaches (plus `pad_px` for `sharpen`):
    (n, rows, cols) and the row and column slices of the full image it covers."""
    wx, wy, wz = _blur_weights(grid, recon, z_centres, matrix, pixel_mm)
    window = []
    for w in (wy, wx):
        hit = np.flatnonzero(w.any(axis=1))
        lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)
        window.append(slice(max(lo - pad_px, 0), min(hi + pad_px, matrix)))
    rows, cols = window
    return _apply(phantom, wx[cols], wy[rows], wz), rows, cols


def sharpen(img: np.ndarray, recon: Reconstruction) -> np.ndarray:
    """Bone kernels: unsharp mask in-plane (edge overshoot), in place; soft kernels leave the slices as they are."""
    if recon.sharpen > 0:
        img += np.float32(recon.sharpen) * (img - ndi.gaussian_filter(img, (0, 1.2, 1.2)))
    return img


def _bone_fraction(img: np.ndarray) -> np.ndarray:
    """Per slice: fraction of dense bone in the central part of the head (the calvarium at the rim does not
    count), about 0 above the skull base and 0.1-0.4 through the petrous bones."""
    step = max(1, img.shape[1] // 64)  # a coarse look is enough
    img = img[:, ::step, ::step]
    n, rows, cols = img.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    out = np.zeros(n)
    for k in range(n):
        head = img[k] > -300
        area = head.sum()
        if area < 50:
            continue
        cy, cx = yy[head].mean(), xx[head].mean()
        central = (yy - cy) ** 2 + (xx - cx) ** 2 < 0.4 * area / np.pi  # radius 0.63 of the head's
        out[k] = (img[k][central] > 700).mean()
    return out


def _add_noise(img: np.ndarray, bone: np.ndarray, recon: Reconstruction, rng: np.random.Generator) -> None:
    """Correlated quantum noise: in-plane filtered white noise with unit variance, scaled per slice.

    Noise is higher in slices where more bone attenuates the beam (the skull base).
    """
    if recon.noise_hu <= 0:
        return
    n, rows, cols = img.shape
    grain = recon.noise_grain_px
    delta = np.zeros((31, 31))
    delta[15, 15] = 1.0
    unit = 1.0 / np.sqrt((ndi.gaussian_filter(delta, grain, truncate=3.0) ** 2).sum())  # restores unit variance
    noise = ndi.gaussian_filter(rng.standard_normal((n, rows, cols), dtype=np.float32), (0, grain, grain),
                                truncate=3.0)
    per_slice = (recon.noise_hu * unit * (1.0 + 2.0 * np.clip(bone, 0.0, 0.4))).astype(np.float32)
    img += noise * per_slice[:, None, None]


def _add_streaks(img: np.ndarray, bone: np.ndarray, amplitude: float, rng: np.random.Generator) -> None:
    """Beam-hardening look-alikes in the skull base: a dark band between the densest bones of a slice (the
    petrous "Hounsfield bar") and a few thin streaks radiating from them."""
    if amplitude <= 0:
        return
    n, rows, cols = img.shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    for k in np.nonzero(bone > 0.05)[0]:
        sl = img[k]
        head = sl > -300
        strength = np.float32(amplitude * min(1.0, (bone[k] - 0.05) / 0.15))
        step = max(1, rows // 64)  # the densest bone of each half, found on a coarse copy
        dense = ndi.uniform_filter(sl[::step, ::step], 3)
        half = dense.shape[1] // 2
        peaks = [np.unravel_index(np.argmax(part), part.shape) for part in (dense[:, :half], dense[:, half:])]
        (r0, c0), (r1, c1) = peaks[0], (peaks[1][0], peaks[1][1] + half)
        if min(dense[r0, c0], dense[r1, c1]) > 1000:
            dist = _segment_distance(xx, yy, c0 * step, r0 * step, c1 * step, r1 * step)
            sl -= strength * np.exp(-0.5 * (dist / 3.0) ** 2) * head
        for _ in range(int(rng.integers(2, 5))):
            r, c = (r0 * step, c0 * step) if rng.random() < 0.5 else (r1 * step, c1 * step)
            angle = rng.uniform(0, np.pi)
            sin, cos = np.float32(np.sin(angle)), np.float32(np.cos(angle))
            dist = np.abs((xx - np.float32(c)) * sin - (yy - np.float32(r)) * cos)
            sign = np.float32(1.0 if rng.random() < 0.4 else -1.0)
            sl += sign * strength * np.float32(rng.uniform(0.3, 0.8)) * np.exp(-0.5 * (dist / 0.8) ** 2) * head


def _segment_distance(xx, yy, x0, y0, x1, y1) -> np.ndarray:
    dx, dy = np.float32(x1 - x0), np.float32(y1 - y0)
    h = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy + np.float32(1e-6)), 0.0, 1.0)
    return np.hypot(xx - x0 - h * dx, yy - y0 - h * dy)


def localizer(phantom: np.ndarray, grid: Grid, table_z: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Lateral scout: attenuation summed across the head (rows: superior -> inferior, columns: anterior ->
    posterior). Returns (rows, cols) uint16 display values, the LPS of pixel (0, 0), and the pixel size (mm)."""
    mu = np.clip((phantom + 1000.0) / 1000.0, 0.0, None) * 0.019  # linear attenuation per mm, water = 0.019
    line = mu.sum(axis=0) * grid.spacing  # (ny, nz) line integrals
    image = np.clip(line / 4.5 * 3000.0, 0, 4095)[::-1, ::-1].T  # rows = -z, cols = -y (anterior first)
    top_left = np.array([0.0, grid.axis(1)[-1], grid.axis(2)[-1]])
    return np.rint(image).astype(np.uint16), patient_to_lps(top_left, table_z), grid.spacing
