"""Series quality control, and the choice of series per study; every decision carries a reason code.

QC (`qc_series`, rules from `ingest.qc`: headct.config.QcRules): the series' input format runs its header checks
(`InputFormat.header_qc`, headct.data.formats; built from headct.data.qc), then the geometry checks shared by
every format run on the stack it returns; first failing check wins. DICOM (classic and Enhanced CT), in order:
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
    invalid_header         a geometry or rescale value not finite, a degenerate orientation, PixelSpacing <= 0
                           (headct.data.header_checks, like the three below: before any arithmetic or allocation)
    no_pixel_data          a file without PixelData
    pixel_data_mismatch    a file's PixelData shorter than Rows x Columns x frames x BitsAllocated needs
    too_large              Rows or Columns beyond header_checks.MAX_MATRIX; after every check, a series whose
                           conversion would not fit in memory (headct.data.parallel.memory_check, by ingest)
    duplicate_positions    two images at the same position along the slice normal (< 0.01 mm apart)
    non_axial              slice normal more than `max_oblique_deg` from the head-foot axis (sagittal/coronal);
                           within it the series is oblique, accepted and resampled
    gantry_tilt            positions advance at an angle to the normal beyond `max_tilt_deg`, or any tilt with
                           `gantry_tilt: reject`; otherwise corrected by resampling at the true positions
    missing_slices         a gap wider than `max_gap_factor` times the median slice step (missing images)
    too_short              coverage along the slice normal below `min_coverage_mm`
NIfTI files (`headct.data.formats.nifti`; no protocol checks: a NIfTI has no acquisition header):
    not_3d                 not one 3D volume (4D, 2D); then `too_large` for an axis beyond MAX_MATRIX,
                           `criteria` whenever a criteria CSV is set,
                           `inconsistent_geometry` for an unusable affine, and the shared geometry checks
                           (too_few_slices, duplicate_positions ... too_short) on the stack the affine describes
Found later, on the pixels of a chosen series (`headct.data.ingest`; the next-ranked series is tried then; a
format's `load_hu` raises SourceDataError with the code):
    unreadable             pixel data cannot be decoded or has no rescale slope/intercept; NIfTI data that
                           cannot be read (corrupt or truncated gzip)
    no_pixel_data          a file without PixelData that the header read could not tell (a deflated file)
    not_finite             a NIfTI with a NaN or infinite value anywhere (every voxel is checked)
    not_hu                 values that are not HU (no air below -500, or bright voxels beyond 3000), any format;
                           negative HU wrapped in unsigned pixels are corrected instead when unambiguous
                           (`headct.data.formats.hu`; the manifest's `pixel_fix` says so)
    empty_volume           no voxel above the head threshold (nothing to centre on)
    head_cropped           the canonical grid cuts more than `max_crop_mm` of the head along an axis
                           (`headct.data.convert`; the cropped mm per axis are in the manifest either way)
    no_patient_key         the series has no patient key (no PatientID, or no folder under SRC)
    duplicate              the same SOP instances or the same pixel content as an accepted series (named)
At either stage, an exception no check foresaw (headct.data.guards.unexpected):
    internal_error         the series' QC or conversion failed unexpectedly (the type in rejects.csv, the text
                           on the terminal); the run goes on
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

from headct.config.data import QcRules
from headct.data import formats
from headct.data.criteria import Criteria
from headct.data.qc import QcResult, geometry_checks, is_contrast
from headct.data.series import Series, StackGeometry

__all__ = ["QcResult", "is_bone_kernel", "is_contrast", "qc_series", "rank_series", "slice_thickness_mm",
           "why_not_selected"]

THICKNESS_RANGE_MM = QcRules().thickness_range_mm
_SHARP_WORDS = ("BONE", "SHARP", "LUNG", "EDGE")
_NUMBERED_KERNEL = re.compile(r"^[A-Z]{1,2}(\d{2})")  # Siemens H30s / Hr64 / B60f / J70h
_COVERAGE_STEP_MM = 10.0


def is_bone_kernel(kernel: str, description: str = "") -> bool:
    text = kernel.upper()
    if any(word in text for word in _SHARP_WORDS) or "BONE" in description.upper():
        return True
    match = _NUMBERED_KERNEL.match(text)
    return bool(match) and int(match.group(1)) >= 60


def qc_series(series: Series, rules: QcRules | None = None, criteria: Criteria | None = None) -> QcResult:
    """Check one series from its headers: its format's checks, then the shared geometry checks; returns the
    first failing reason, or the stack geometry."""
    rules = rules or QcRules()
    found = formats.of(series).header_qc(series, rules, criteria)
    return found if isinstance(found, QcResult) else geometry_checks(found, rules)


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
