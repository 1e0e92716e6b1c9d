"""Series quality control, and the choice of series per study; every decision carries a reason code.

QC (`qc_series`, rules from `ingest.qc`: headct.config.QcRules), first failing check wins:
    dose_report            a radiation dose report (Dose SR, or a "dose report"/"patient protocol" screen)
    secondary_capture      a secondary capture (an image of a screen, not an acquisition)
    not_ct                 Modality is not CT
    localizer              ImageType contains LOCALIZER, or the series is a single image
    unsupported            a multi-frame object without per-frame positions (cannot be placed slice by slice)
    description            study or series description matches `description_deny` (angiography, perfusion ...)
    contrast               contrast-enhanced (ContrastBolusAgent, or "post contrast"/"C+" in the description)
    kernel                 ConvolutionKernel matches `kernel_deny`, or no pattern of a non-empty `kernel_allow`
    kvp                    KVP outside `kvp_range`
    criteria               no row of the filter-criteria CSV (`criteria_csv`) matches
    too_few_slices         fewer images than `min_slices`
    missing_geometry       ImagePositionPatient / ImageOrientationPatient / PixelSpacing / Rows missing
    inconsistent_geometry  orientation, pixel spacing, rows or columns differ within the series
    duplicate_positions    two images at the same position along the slice normal (< 0.01 mm apart)
    non_axial              slice normal more than `max_oblique_deg` from the head-foot axis (sagittal/coronal);
                           within it the series is oblique, accepted and resampled
    gantry_tilt            positions advance at an angle to the normal beyond `max_tilt_deg`, or any tilt with
                           `gantry_tilt: reject`; otherwise corrected by resampling at the true positions
    missing_slices         a gap wider than `max_gap_factor` times the median slice step (missing images)
    too_short              coverage along the slice normal below `min_coverage_mm`
NIfTI files (`headct.data.nifti_input`):
    not_3d                 not one 3D volume (4D, 2D); then the geometry checks above from its affine
Found later, on the pixels of a chosen series (`headct.data.ingest`; the next-ranked series is tried then):
    unreadable             pixel data cannot be decoded or has no rescale slope/intercept
    not_hu                 a NIfTI whose values are not HU (no air below -500, or bright voxels beyond 3100)
    empty_volume           no voxel above the head threshold (nothing to centre on)
    no_patient_key         the series has no patient key (no PatientID, or no folder under SRC)
    duplicate              the same SOP instances or the same pixel content as an accepted series (named)
And for the valid series that lost:
    not_selected           passed QC, but another series of the same study was preferred (`keep: best`)

Selection (`rank_series`): among the series of one study that pass QC, prefer, in this order,
    1. a soft-tissue kernel over a bone/sharp one (`is_bone_kernel`: BONE, SHARP, LUNG, EDGE in the kernel or
       BONE in the description, or a Siemens-style kernel number >= 60 such as H70h, Hr64, B60f),
    2. no contrast agent (ContrastBolusAgent empty; description not "post contrast"/"C+"),
    3. slice thickness within `thickness_range_mm` (default 0.5-5.0 mm),
    4. more coverage along the slice normal, compared in 10 mm steps (a thin and a thick series of the same
       head tie here instead of the thick one winning by a fraction of a slice),
    5. more slices,
    6. the SeriesInstanceUID, so ties are broken the same way on every run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from headct.config.data import QcRules
from headct.data import nifti_input
from headct.data.criteria import Criteria
from headct.data.dicom_series import Series, StackGeometry, stack_geometry

THICKNESS_RANGE_MM = QcRules().thickness_range_mm
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1-.7.4
_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
_DOSE_TEXT = re.compile(r"\bDOSE\b|PATIENT PROTOCOL|DOSE ?REPORT")
_TILT_TOLERANCE_DEG = 0.5  # positions rounded in the header give a few hundredths of a degree, not more
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


def _is_secondary_capture(sop_class_uid: str) -> bool:
    return sop_class_uid == _SECONDARY_CAPTURE or sop_class_uid.startswith(_SECONDARY_CAPTURE + ".")


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


def _protocol_checks(series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | None:
    """The acquisition/protocol rules (headers only)."""
    first = series.first
    for text in (first.study_description, first.series_description):
        for pattern in rules.description_deny:
            if re.search(pattern, text, re.IGNORECASE):
                return QcResult("description", f"description {text!r} matches description_deny {pattern!r}")
    if rules.contrast == "reject" and is_contrast(series):
        return QcResult("contrast", "contrast-enhanced (ContrastBolusAgent or description); contrast: reject")
    kernel = first.kernel
    for pattern in rules.kernel_deny:
        if re.search(pattern, kernel, re.IGNORECASE):
            return QcResult("kernel", f"kernel {kernel!r} matches kernel_deny {pattern!r}")
    if rules.kernel_allow and not any(re.search(p, kernel, re.IGNORECASE) for p in rules.kernel_allow):
        return QcResult("kernel", f"kernel {kernel or '(none)'!r} matches no kernel_allow pattern")
    if rules.kvp_range is not None and first.kvp is not None:
        lo, hi = rules.kvp_range
        if not lo <= first.kvp <= hi:
            return QcResult("kvp", f"KVP {first.kvp:g} outside kvp_range [{lo:g}, {hi:g}]")
    if criteria is not None and not criteria.matches(first.study_description, first.kvp, kernel):
        return QcResult("criteria", f"no criteria_csv row matches (study description {first.study_description!r}, "
                                    f"KVP {first.kvp}, kernel {kernel!r})")
    return None


def _geometry_checks(geometry: StackGeometry, rules: QcRules) -> QcResult:
    """Checks on the ordered stack, shared by DICOM and NIfTI."""
    steps = geometry.steps_mm
    if geometry.n_slices < rules.min_slices:
        return QcResult("too_few_slices", f"{geometry.n_slices} slices, fewer than min_slices={rules.min_slices}")
    if steps.min() < 0.01:
        dupes = int((steps < 0.01).sum())
        return QcResult("duplicate_positions", f"{dupes} image(s) share a position along the slice normal")
    angle = float(np.degrees(np.arccos(min(1.0, abs(geometry.normal[2])))))
    if angle > rules.max_oblique_deg:
        return QcResult("non_axial", f"slice normal {angle:.0f} degrees from the head-foot axis "
                                     f"(max_oblique_deg={rules.max_oblique_deg:g})")
    tilt = geometry.tilt_deg
    if tilt > rules.max_tilt_deg:
        return QcResult("gantry_tilt", f"gantry tilt {tilt:.1f} degrees beyond max_tilt_deg={rules.max_tilt_deg:g}")
    if rules.gantry_tilt == "reject" and tilt > _TILT_TOLERANCE_DEG:
        return QcResult("gantry_tilt", f"gantry tilt {tilt:.1f} degrees (gantry_tilt: reject)")
    if steps.max() > rules.max_gap_factor * geometry.step_mm:
        return QcResult("missing_slices", f"a {steps.max():.1f} mm gap with a median slice step of "
                                          f"{geometry.step_mm:.2f} mm (max_gap_factor={rules.max_gap_factor:g})")
    if geometry.coverage_mm < rules.min_coverage_mm:
        return QcResult("too_short", f"{geometry.coverage_mm:.0f} mm coverage, less than "
                                     f"min_coverage_mm={rules.min_coverage_mm:g}")
    return QcResult(None, "ok", geometry)


def _nifti_qc(series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult:
    problem = nifti_input.shape_problem(series.nifti)
    if problem:
        return QcResult("not_3d", problem)
    if criteria is not None:
        return QcResult("criteria", "a NIfTI file has no DICOM header to match against criteria_csv")
    geometry = nifti_input.geometry(series.nifti)
    if isinstance(geometry, str):
        return QcResult("inconsistent_geometry", geometry)
    return _geometry_checks(geometry, rules)


def qc_series(series: Series, rules: QcRules | None = None, criteria: Criteria | None = None) -> QcResult:
    """Check one series from its headers; returns the first failing reason, or the stack geometry."""
    rules = rules or QcRules()
    if series.nifti is not None:
        return _nifti_qc(series, rules, criteria)
    first, slices, n = series.first, series.slices, len(series.slices)
    screen = _is_secondary_capture(first.sop_class_uid) or first.modality != "CT" or any(
        "SCREEN SAVE" in t for t in first.image_type)  # "LOW DOSE HEAD" on a real CT series is not a report
    if first.sop_class_uid == _DOSE_SR or (screen and _DOSE_TEXT.search(first.series_description.upper())):
        return QcResult("dose_report", "radiation dose report (Dose SR or a dose screen), not an image volume")
    if _is_secondary_capture(first.sop_class_uid):
        return QcResult("secondary_capture", "secondary capture (an image of a screen, not a CT acquisition)")
    if first.modality != "CT":
        return QcResult("not_ct", f"Modality is {first.modality or 'missing'}, not CT")
    if any("LOCALIZER" in s.image_type for s in slices):
        return QcResult("localizer", "ImageType says LOCALIZER (a scout image)")
    if any(s.frame_problem for s in slices):
        return QcResult("unsupported", next(s.frame_problem for s in slices if s.frame_problem))
    if n == 1:
        return QcResult("localizer", "a single image, not a volume")
    protocol = _protocol_checks(series, rules, criteria)
    if protocol is not None:
        return protocol
    if n < rules.min_slices:
        return QcResult("too_few_slices", f"{n} images, fewer than min_slices={rules.min_slices}")
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
    return _geometry_checks(stack_geometry(series), rules)


def slice_thickness_mm(series: Series, geometry: StackGeometry) -> float:
    """SliceThickness from the header, else the median slice step."""
    return series.first.slice_thickness or geometry.step_mm


def _preference(series: Series, geometry: StackGeometry, rules: QcRules | None = None) -> tuple:
    lo, hi = (rules or QcRules()).thickness_range_mm
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
    "a series with slice thickness within thickness_range_mm was preferred",
    "a series with more coverage along the head-foot axis was preferred",
    "a series with more slices was preferred",
    "an equally good series was preferred (deterministic tie-break)",
)


def rank_series(valid: list[tuple[Series, StackGeometry]], rules: QcRules | None = None
                ) -> list[tuple[Series, StackGeometry]]:
    """The valid series of one study, best first (see the module docstring for the order)."""
    return sorted(valid, key=lambda sg: _preference(*sg, rules))


def why_not_selected(loser: tuple[Series, StackGeometry], winner: tuple[Series, StackGeometry],
                     rules: QcRules | None = None) -> str:
    """The first selection criterion on which `loser` lost to `winner` (for the rejects message)."""
    for criterion, a, b in zip(_CRITERIA, _preference(*loser, rules), _preference(*winner, rules), strict=True):
        if a != b:
            return criterion
    return _CRITERIA[-1]
