"""The format-neutral building blocks of series QC (the reason codes are listed in headct.data.selection).

A format's `header_qc` (headct.data.formats) composes the header checks it can apply, in order:
    acquisition_checks   description, contrast, kernel, kVp and the criteria CSV (header text and numbers)
    stack_checks         enough images, every slice placed in space, one orientation/spacing/size
and `headct.data.selection.qc_series` then runs `geometry_checks` on the stack geometry the format returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headct.config.data import QcRules
from headct.data.criteria import Criteria
from headct.data.series import Series, StackGeometry

_TILT_TOLERANCE_DEG = 0.5  # positions rounded in the header give a few hundredths of a degree, not more
_CONTRAST_TEXT = re.compile(r"POST[ -]?CON|CONTRAST|\bC\+|\bW/ ?CON|\bWITH CON|\bCE\b")
_NO_CONTRAST_TEXT = re.compile(r"NON[ -]?CON|WITHOUT|\bW/?O\b|\bNO CON|\bPLAIN\b|\bNC\b")


@dataclass(frozen=True)
class QcResult:
    reason: str | None  # None: the series is usable
    message: str  # no paths or UIDs: this goes to rejects.csv
    geometry: StackGeometry | None = None
    path: Path | None = None  # the file at fault, where one is (named on the terminal only, relative to SRC)


def is_contrast(series: Series) -> bool:
    agent = series.first.contrast_agent.upper()
    if agent and agent not in ("NONE", "NO", "N/A"):
        return True
    text = series.first.series_description.upper()
    return bool(_CONTRAST_TEXT.search(text)) and not _NO_CONTRAST_TEXT.search(text)


def acquisition_checks(series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | None:
    """The acquisition/protocol rules on the first header's descriptions, contrast agent, kernel and kVp."""
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


def stack_checks(series: Series, rules: QcRules) -> QcResult | None:
    """Enough images, and every slice placed in space with one orientation, pixel spacing and size, so that
    `headct.data.series.stack_geometry` applies."""
    slices, n = series.slices, len(series.slices)
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
    return None


def geometry_checks(geometry: StackGeometry, rules: QcRules) -> QcResult:
    """Checks on the ordered stack, shared by every format; the QcResult of a usable series holds its geometry."""
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
