"""Is a volume in Hounsfield units? The physical-plausibility test every converted series passes (whatever its
format), and the one correction of stored values that is made: negative HU that wrapped around.

Plausible CT in HU (`check_hu`): air (about -1000) among the darkest 1 % of the voxels and the brightest 1 %
below 3000 HU (bone and enamel; the top of the 12-bit CT range is 3071). MR intensities, 0-1 normalised images,
unscaled stored values (air at 0) and wrapped values (air at about +3100) all fail it: reason `not_hu`.

Wrapped negative HU (`plausible`): a file whose pixels are two's-complement numbers of `BitsStored` bits but
whose header declares them unsigned (PixelRepresentation 0), with a RescaleIntercept near 0, reads every negative
HU h as h + 2^BitsStored x slope: air at about +3100 HU instead of -1000 in 12-bit data (the RSNA 2019 download's
known defect, seen there with BitsStored 12 and RescaleIntercept about 0). It is detected from the values, never
from a list of files, and corrected when the pattern is unambiguous:
    1. the volume as declared fails `check_hu`, and the header says unsigned with BitsStored b (8 to 16);
    2. every stored value fits b bits (else the wrap is not one of b bits);
    3. re-read as signed (stored >= 2^(b-1) -> stored - 2^b), the volume passes `check_hu`;
    4. at most AMBIGUOUS_FRACTION of the voxels land below -1100 HU once re-read (below air, so either reading
       is as likely: bone or metal above 2^(b-1) HU as declared, or nothing physical as re-read); padding
       outside the reconstructed field, one constant at the volume's minimum at or below -1000 HU, is set aside.
The correction is recorded per scan (manifest column `pixel_fix`, e.g. `signed_12bit`); a volume that fails
`check_hu` and cannot be corrected so is rejected `not_hu`, never ingested as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headct.data.formats.base import SourceDataError
from headct.data.series import Series, StackGeometry

AIR_BELOW_HU = -500.0
# Cortical bone and tooth enamel stay below 3000 HU; a 99th percentile above it is not anatomy. Wrapped 12-bit air
# reads 3072-3100 HU, so it fails this test even when padding (-1024) gives the volume a dark 1 %.
BRIGHT_BELOW_HU = 3000.0
BELOW_AIR_HU = -1100.0  # re-read values below this are not tissue, air or noise around air
AMBIGUOUS_FRACTION = 0.005  # of the voxels (outside-the-field padding excluded)
_SAMPLE_SLICES = 32


class NotHuError(SourceDataError):
    """The values are not Hounsfield units (reason `not_hu`)."""

    reason = "not_hu"


def _sample(hu: np.ndarray) -> np.ndarray:
    return hu[:: max(1, hu.shape[0] // _SAMPLE_SLICES), ::4, ::4]


def hu_problem(hu: np.ndarray) -> str | None:
    """Why the finite values `hu` do not look like CT Hounsfield units (judged on a sample), or None."""
    low, high = np.percentile(_sample(hu), [1, 99])
    if low > AIR_BELOW_HU or high > BRIGHT_BELOW_HU:
        return (f"values do not look like HU (1st percentile {low:.0f}, 99th {high:.0f}; CT in HU has air below "
                f"{AIR_BELOW_HU:.0f} and bone below {BRIGHT_BELOW_HU:.0f})")
    return None


def check_hu(hu: np.ndarray, path: Path) -> None:
    """Raise NotHuError (naming `path`, terminal only) unless `hu` looks like CT Hounsfield units."""
    problem = hu_problem(hu)
    if problem is not None:
        raise NotHuError(path, problem)


def _rescales(series: Series, geometry: StackGeometry) -> tuple[np.ndarray, np.ndarray] | None:
    """(slope, intercept) per slice in stack order, or None when a slice has none."""
    pairs = [series.slices[i].rescale for i in geometry.order]
    if any(p is None for p in pairs):
        return None
    slopes, intercepts = (np.asarray(v, np.float64) for v in zip(*pairs, strict=True))
    return slopes, intercepts


def _signed_reading(hu: np.ndarray, series: Series, geometry: StackGeometry) -> tuple[np.ndarray, str] | str:
    """The volume re-read as two's complement of BitsStored bits, and its `pixel_fix` name; or why not (the
    module docstring's conditions 1-2, 4)."""
    first = series.first
    bits = first.bits_stored
    if first.pixel_signed is not False or bits is None or not 8 <= bits <= 16:
        return "the header does not declare unsigned pixels of 8 to 16 bits, so no wrap can be undone"
    rescale = _rescales(series, geometry)
    if rescale is None or np.any(rescale[0] <= 0):
        return "no usable RescaleSlope/RescaleIntercept"
    slope, intercept = (v[:, None, None] for v in rescale)
    stored = np.rint((hu - intercept) / slope)  # float64, exact for 16-bit stored values
    # padding outside the reconstructed field: one constant at the volume's minimum, at or below -1000 HU as
    # read (load_hu's pad_hu for a declared PixelPaddingValue); it is left as it is
    low = float(hu.min())
    padded = hu == low if low <= -1000.0 else np.zeros(hu.shape, bool)
    if stored[~padded].max(initial=0) >= 2**bits or stored[~padded].min(initial=0) < 0:
        return f"stored values do not fit the declared {bits} unsigned bits"
    fixed = np.where(stored >= 2 ** (bits - 1), stored - 2**bits, stored) * slope + intercept
    fixed[padded] = hu[padded]
    ambiguous = float(np.mean(fixed[~padded] < BELOW_AIR_HU)) if (~padded).any() else 0.0
    if ambiguous > AMBIGUOUS_FRACTION:
        return (f"{ambiguous:.1%} of the voxels would read below {BELOW_AIR_HU:.0f} HU as signed values: the wrap "
                "is ambiguous")
    problem = hu_problem(fixed)
    if problem is not None:
        return f"read as signed {bits}-bit values too: {problem}"
    return fixed.astype(np.float32), f"signed_{bits}bit"


def plausible(hu: np.ndarray, series: Series, geometry: StackGeometry, path: Path) -> tuple[np.ndarray, str]:
    """(HU stack, pixel_fix): `hu` itself and "" when it looks like HU; the corrected stack and the name of the
    correction when its negative values wrapped around unambiguously; else NotHuError (module docstring)."""
    problem = hu_problem(hu)
    if problem is None:
        return hu, ""
    found = _signed_reading(hu, series, geometry)
    if isinstance(found, str):
        raise NotHuError(path, f"{problem}; not corrected: {found}")
    return found
