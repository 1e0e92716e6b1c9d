"""Series quality control, and the choice of one series per study; every decision carries a reason code.

QC (`qc_series`), first failing check wins:
    not_ct                 Modality is not CT, or a secondary capture (screenshots, not acquisitions)
    unsupported            multi-frame objects (Enhanced CT) are not read by this version
    localizer              ImageType contains LOCALIZER, or the series is a single image
    too_few_slices         fewer images than `min_slices`
    missing_geometry       ImagePositionPatient / ImageOrientationPatient / PixelSpacing / Rows missing
    inconsistent_geometry  orientation, pixel spacing, rows or columns differ within the series
    duplicate_positions    two images at the same position along the slice normal (< 0.01 mm apart)
    non_axial              slice normal more than 45 degrees from the head-foot axis (sagittal/coronal)
    missing_slices         a gap wider than twice the median slice step (missing images)
Found later, on the pixels of the chosen series (`headct.data.ingest`; the next-ranked series is tried then):
    unreadable             pixel data cannot be decoded or has no rescale slope/intercept
    empty_volume           no voxel above the head threshold (nothing to centre on)
    no_patient_key         the series has no patient key (no PatientID, or no folder under SRC)
And for the valid series that lost:
    not_selected           passed QC, but another series of the same study was preferred

Selection (`rank_series`): among the series of one study that pass QC, prefer, in this order,
    1. a soft-tissue kernel over a bone/sharp one (`is_bone_kernel`: BONE, SHARP, LUNG, EDGE in the kernel or
       BONE in the description, or a Siemens-style kernel number >= 60 such as H70h, Hr64, B60f),
    2. no contrast agent (ContrastBolusAgent empty; description not "post contrast"/"C+"),
    3. slice thickness within [0.5, 5.0] mm,
    4. more coverage along the slice normal, compared in 10 mm steps (a thin and a thick series of the same
       head tie here instead of the thick one winning by a fraction of a slice),
    5. more slices,
    6. the SeriesInstanceUID, so ties are broken the same way on every run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from headct.data.dicom_series import Series, StackGeometry, stack_geometry

THICKNESS_RANGE_MM = (0.5, 5.0)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SHARP_WORDS = ("BONE", "SHARP", "LUNG", "EDGE")
_NUMBERED_KERNEL = re.compile(r"^[A-Z]{1,2}(\d{2})")  # Siemens H30s / Hr64 / B60f / J70h
_CONTRAST_TEXT = re.compile(r"POST[ -]?CON|CONTRAST|\bC\+|\bW/ ?CON|\bWITH CON|\bCE\b")
_NO_CONTRAST_TEXT = re.compile(r"NON[ -]?CON|WITHOUT|\bW/?O\b|\bNO CON|\bPLAIN\b|\bNC\b")
_COVERAGE_STEP_MM = 10.0


@dataclass(frozen=True)
class QcResult:
    reason: str | None  # None: the series is usable
    message: str  # no paths or UIDs: this goes to rejects.csv
    geometry: StackGeometry | None = None


def is_bone_kernel(kernel: str, description: str = "") -> bool:
    text = kernel.upper()
    if any(word in text for word in _SHARP_WORDS) or "BONE" in description.upper():
        return True
    match = _NUMBERED_KERNEL.match(text)
    return bool(match) and int(match.group(1)) >= 60


def is_contrast(series: Series) -> bool:
    agent = series.first.contrast_agent.upper()
    if agent and agent not in ("NONE", "NO", "N/A"):
        return True
    text = series.first.series_description.upper()
    return bool(_CONTRAST_TEXT.search(text)) and not _NO_CONTRAST_TEXT.search(text)


def qc_series(series: Series, min_slices: int) -> QcResult:
    """Check one series from its headers; returns the first failing reason, or the stack geometry."""
    first, slices, n = series.first, series.slices, len(series.slices)
    if first.modality != "CT":
        return QcResult("not_ct", f"Modality is {first.modality or 'missing'}, not CT")
    if first.sop_class_uid.startswith(_SECONDARY_CAPTURE):
        return QcResult("not_ct", "secondary capture (an image of a screen, not a CT acquisition)")
    if any(s.frames > 1 for s in slices):
        return QcResult("unsupported", "multi-frame object (Enhanced CT); not read by this version")
    if any("LOCALIZER" in s.image_type for s in slices):
        return QcResult("localizer", "ImageType says LOCALIZER (a scout image)")
    if n == 1:
        return QcResult("localizer", "a single image, not a volume")
    if n < min_slices:
        return QcResult("too_few_slices", f"{n} images, fewer than min_slices={min_slices}")
    if any(s.position is None or s.orientation is None or s.pixel_spacing is None or s.rows is None
           or s.cols is None for s in slices):
        return QcResult("missing_geometry", "ImagePositionPatient/ImageOrientationPatient/PixelSpacing/Rows missing")
    iop = np.asarray([s.orientation for s in slices])
    spacing = np.asarray([s.pixel_spacing for s in slices])
    if np.abs(iop - iop[0]).max() > 1e-3:
        return QcResult("inconsistent_geometry", "ImageOrientationPatient differs between images")
    if np.abs(spacing - spacing[0]).max() > 1e-3:
        return QcResult("inconsistent_geometry", "PixelSpacing differs between images")
    if len({(s.rows, s.cols) for s in slices}) > 1:
        return QcResult("inconsistent_geometry", "Rows/Columns differ between images")
    geometry = stack_geometry(series)
    steps = geometry.steps_mm
    if steps.min() < 0.01:
        dupes = int((steps < 0.01).sum())
        return QcResult("duplicate_positions", f"{dupes} image(s) share a position along the slice normal")
    angle = float(np.degrees(np.arccos(min(1.0, abs(geometry.normal[2])))))
    if angle > 45.0:
        return QcResult("non_axial", f"slice normal {angle:.0f} degrees from the head-foot axis")
    if steps.max() > 2.0 * geometry.step_mm:
        return QcResult(
            "missing_slices", f"a {steps.max():.1f} mm gap with a median slice step of {geometry.step_mm:.2f} mm"
        )
    return QcResult(None, "ok", geometry)


def slice_thickness_mm(series: Series, geometry: StackGeometry) -> float:
    """SliceThickness from the header, else the median slice step."""
    return series.first.slice_thickness or geometry.step_mm


def _preference(series: Series, geometry: StackGeometry) -> tuple:
    lo, hi = THICKNESS_RANGE_MM
    thickness = slice_thickness_mm(series, geometry)
    return (
        is_bone_kernel(series.first.kernel, series.first.series_description),
        is_contrast(series),
        not lo <= thickness <= hi,
        -round(geometry.coverage_mm / _COVERAGE_STEP_MM),
        -geometry.n_slices,
        series.series_uid,
    )


_CRITERIA = (
    "a soft-tissue kernel was preferred over this bone/sharp kernel",
    "a series without contrast agent was preferred",
    f"a series with slice thickness within {THICKNESS_RANGE_MM[0]}-{THICKNESS_RANGE_MM[1]} mm was preferred",
    "a series with more coverage along the head-foot axis was preferred",
    "a series with more slices was preferred",
    "an equally good series was preferred (deterministic tie-break)",
)


def rank_series(valid: list[tuple[Series, StackGeometry]]) -> list[tuple[Series, StackGeometry]]:
    """The valid series of one study, best first (see the module docstring for the order)."""
    return sorted(valid, key=lambda sg: _preference(*sg))


def why_not_selected(loser: tuple[Series, StackGeometry], winner: tuple[Series, StackGeometry]) -> str:
    """The first selection criterion on which `loser` lost to `winner` (for the rejects message)."""
    for criterion, a, b in zip(_CRITERIA, _preference(*loser), _preference(*winner), strict=True):
        if a != b:
            return criterion
    return _CRITERIA[-1]
