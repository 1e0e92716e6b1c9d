"""Header values checked before any arithmetic or allocation is done with them (reason codes in docs/contracts.md).

A header from a hospital export can hold anything: a NaN in ImagePositionPatient, an all-zero
ImageOrientationPatient, PixelSpacing 0, Rows = Columns = 65535 over a few bytes of pixel data. Ordering
slices, ranking series, resampling and allocating the HU stack all compute with these values, so a series
whose values are unusable is rejected here, by reason code, before any of that runs:
    invalid_header       a position, orientation, pixel spacing, slice thickness or rescale value that is not a
                         finite number; an orientation whose row or column vector has no length or whose two
                         vectors are not perpendicular (parallel ones span no plane); PixelSpacing <= 0;
                         Rows/Columns below 1
    no_pixel_data        a file of the series has no PixelData element
    pixel_data_mismatch  a file's PixelData is shorter than Rows x Columns x frames x samples x BitsAllocated / 8
                         (a truncated transfer, or a header that claims a matrix its data does not hold)
    too_large            Rows or Columns beyond MAX_MATRIX (a NIfTI: any axis), whatever the pixel data says
                         (compressed data has no length to compare)
Formats call these from their `header_qc` (headct.data.formats).
"""

from __future__ import annotations

import math

import numpy as np

from headct.data.qc import QcResult
from headct.data.series import Series

# Largest Rows/Columns (and NIfTI axis) read: CT reconstructs 512 x 512, high-resolution protocols 1024 or 2048;
# 8192 leaves room and caps one slice at 256 MiB of float32.
MAX_MATRIX = 8192
# |cos| of the angle between the row and column directions: DICOM's decimal strings give about 1e-6 on a real
# scanner; 0.01 is half a degree off perpendicular, beyond which the slice is not a rectangle of pixels.
ORTHOGONAL_TOLERANCE = 0.01


def _finite(values: tuple[float, ...] | None) -> bool:
    return values is None or all(math.isfinite(v) for v in values)


def value_checks(series: Series) -> QcResult | None:
    """`invalid_header` for the first slice whose values cannot be computed with (module docstring); geometry
    fields must be present (qc.stack_checks runs first)."""
    for s in series.slices:
        for name, values in (("ImagePositionPatient", s.position), ("ImageOrientationPatient", s.orientation),
                             ("PixelSpacing", s.pixel_spacing), ("RescaleSlope/Intercept", s.rescale),
                             ("SliceThickness", None if s.slice_thickness is None else (s.slice_thickness,))):
            if not _finite(values):
                return QcResult("invalid_header", f"{name} holds a value that is not a finite number", path=s.path)
        iop = np.asarray(s.orientation, float)
        lengths = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
        if min(lengths) < 1e-6:
            return QcResult("invalid_header", "ImageOrientationPatient has a row or column direction of zero length",
                            path=s.path)
        if abs(float(iop[:3] @ iop[3:])) / (lengths[0] * lengths[1]) > ORTHOGONAL_TOLERANCE:
            return QcResult("invalid_header", "ImageOrientationPatient row and column directions are not "
                                              "perpendicular (parallel directions span no slice plane)", path=s.path)
        if min(s.pixel_spacing) <= 0:
            return QcResult("invalid_header", f"PixelSpacing {list(s.pixel_spacing)} is not positive", path=s.path)
        if min(s.rows, s.cols) < 1:
            return QcResult("invalid_header", f"Rows/Columns {s.rows}/{s.cols}: an image needs at least one pixel",
                            path=s.path)
    return None


def pixel_data_checks(series: Series) -> QcResult | None:
    """`no_pixel_data`, `pixel_data_mismatch`, then `too_large` (module docstring), from the header facts a
    format recorded (SliceHeader.pixel_bytes, pixel_bytes_needed; None where it cannot tell)."""
    for s in series.slices:
        if s.pixel_bytes == 0:
            return QcResult("no_pixel_data", "an image file of the series has no PixelData element", path=s.path)
        if s.pixel_bytes is not None and s.pixel_bytes_needed is not None and s.pixel_bytes < s.pixel_bytes_needed:
            return QcResult("pixel_data_mismatch", f"PixelData holds {s.pixel_bytes} bytes where Rows x Columns x "
                                                   f"frames x BitsAllocated needs {s.pixel_bytes_needed}", path=s.path)
    first = series.first
    found = too_large([(first.rows or 0, first.cols or 0)])
    return QcResult(found.reason, found.message, path=first.path) if found is not None else None


def too_large(shapes: list[tuple[int, ...]]) -> QcResult | None:
    """`too_large` when any axis of these image shapes exceeds MAX_MATRIX."""
    for shape in shapes:
        if max(shape) > MAX_MATRIX:
            return QcResult("too_large", f"image of {' x '.join(map(str, shape))} pixels: beyond {MAX_MATRIX} "
                                         "along an axis")
    return None
