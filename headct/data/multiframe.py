"""Multi-frame (Enhanced CT, PS3.3 A.38) objects: per-frame geometry and rescale from the functional groups.

An Enhanced CT file holds a whole series as frames. Each frame's facts live in its item of
PerFrameFunctionalGroupsSequence, falling back to the single item of SharedFunctionalGroupsSequence:
    PlanePositionSequence[0].ImagePositionPatient         LPS mm of the frame's first pixel
    PlaneOrientationSequence[0].ImageOrientationPatient   six direction cosines
    PixelMeasuresSequence[0].PixelSpacing / SliceThickness mm
    PixelValueTransformationSequence[0].RescaleSlope / RescaleIntercept   HU = stored * slope + intercept
    CTImageFrameTypeSequence[0].FrameType                 e.g. ORIGINAL\\PRIMARY\\AXIAL or ...\\LOCALIZER
`headct.data.dicom_series` turns each frame into one slice header, so ordering, QC and resampling treat an
Enhanced CT object exactly like a folder of single-frame slices. Header-only: no pixels are read here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom


@dataclass(frozen=True)
class FrameFacts:
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale: tuple[float, float] | None
    frame_type: tuple[str, ...] | None


def shared_item(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    """The single item of SharedFunctionalGroupsSequence, or None."""
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _macro(items: list[pydicom.Dataset | None], sequence: str) -> pydicom.Dataset | None:
    """The first item of `sequence` in the per-frame item, else in the shared item."""
    for item in items:
        if item is not None and item.get(sequence):
            return item.get(sequence)[0]
    return None


def floats(item: pydicom.Dataset | None, keyword: str, n: int) -> tuple[float, ...] | None:
    """`n` floats from a multi-valued DICOM attribute of `item` (a dataset or a functional-group item), or None
    when the item, the attribute or a number in it is missing or malformed."""
    value = item.get(keyword) if item is not None else None
    if value is None or len(value) != n:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def nested_float(item: pydicom.Dataset | None, sequence: str, keyword: str) -> float | None:
    macro = _macro([item], sequence)
    value = macro.get(keyword) if macro is not None else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def nested_text(item: pydicom.Dataset | None, sequence: str, keyword: str) -> str:
    macro = _macro([item], sequence)
    value = macro.get(keyword) if macro is not None else None
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def frame_facts(ds: pydicom.Dataset) -> list[FrameFacts] | str:
    """Per-frame geometry and rescale of a multi-frame object, or why it has none (then it cannot be placed
    in space slice by slice, e.g. a multi-frame secondary capture or a cine)."""
    frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return f"multi-frame object ({frames} frames) without per-frame functional groups (no slice positions)"
    if len(per_frame) != frames:
        return f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {frames} frames"
    shared = shared_item(ds)
    facts = []
    for item in per_frame:
        items = [item, shared]
        position = _macro(items, "PlanePositionSequence")
        orientation = _macro(items, "PlaneOrientationSequence")
        measures = _macro(items, "PixelMeasuresSequence")
        transform = _macro(items, "PixelValueTransformationSequence")
        frame_type = _macro(items, "CTImageFrameTypeSequence")
        rescale = None
        if transform is not None and ("RescaleSlope" in transform or "RescaleIntercept" in transform):
            rescale = (float(transform.get("RescaleSlope", 1.0)), float(transform.get("RescaleIntercept", 0.0)))
        thickness = measures.get("SliceThickness") if measures is not None else None
        kinds = frame_type.get("FrameType") if frame_type is not None else None
        facts.append(FrameFacts(
            position=floats(position, "ImagePositionPatient", 3),
            orientation=floats(orientation, "ImageOrientationPatient", 6),
            pixel_spacing=floats(measures, "PixelSpacing", 2),
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            rescale=rescale,
            frame_type=tuple(str(t).upper() for t in kinds) if kinds else None,
        ))
    return facts
