"""Multi-frame DICOM (Enhanced CT, PS3.3 A.38): one file holds a whole series as frames, one slice header each.

Each frame's facts live in its item of PerFrameFunctionalGroupsSequence, falling back to the single item of
SharedFunctionalGroupsSequence:
    PlanePositionSequence[0].ImagePositionPatient         LPS mm of the frame's first pixel
    PlaneOrientationSequence[0].ImageOrientationPatient   six direction cosines
    PixelMeasuresSequence[0].PixelSpacing / SliceThickness mm
    PixelValueTransformationSequence[0].RescaleSlope / RescaleIntercept   HU = stored * slope + intercept
    CTImageFrameTypeSequence[0].FrameType                 e.g. ORIGINAL\\PRIMARY\\AXIAL or ...\\LOCALIZER
(kernel and kVp too: CTReconstructionSequence, CTXRayDetailsSequence). So ordering, QC and resampling treat an
Enhanced CT object exactly like a folder of single-frame slices, and its series is a DICOM series in the manifest
(source_format "dicom"). A multi-frame object without per-frame positions (a multi-frame secondary capture, a
cine) is read as one header carrying the problem, which QC rejects as `unsupported`. Pixels: the DICOM reader,
frame by frame (headct.data.formats.dicom.load_hu).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pydicom

from headct.data.formats.base import FileRead, Probe
from headct.data.formats.dicom import (
    DicomFormat,
    dataset,
    floats,
    has_dicom_preamble,
    is_media_index,
    pixel_bytes_needed,
    pixel_data_bytes,
    slice_header,
)
from headct.data.series import Series


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


class EnhancedCtFormat(DicomFormat):
    """Every DICOM object with more than one frame; QC and pixels as classic DICOM (inherited)."""

    name = "enhanced_ct"
    source_format = "dicom"
    label = "DICOM header"

    def claims(self, probe: Probe) -> bool:
        return has_dicom_preamble(probe)

    def read(self, probe: Probe) -> FileRead | None:
        ds = dataset(probe)
        if int(ds.get("NumberOfFrames") or 1) <= 1 or is_media_index(ds):
            return None  # a single-frame file: classic DICOM's
        header = slice_header(probe.path, ds, self.name)
        if isinstance(header, str):
            return FileRead(problem=header)
        shared = shared_item(ds)  # Enhanced CT keeps kernel and kVp in functional groups
        header = replace(header, kernel=header.kernel or nested_text(shared, "CTReconstructionSequence",
                                                                     "ConvolutionKernel"),
                         kvp=header.kvp or nested_float(shared, "CTXRayDetailsSequence", "KVP"),
                         pixel_bytes=pixel_data_bytes(probe), pixel_bytes_needed=pixel_bytes_needed(ds))
        frames = frame_facts(ds)
        if isinstance(frames, str):  # e.g. a multi-frame secondary capture: QC rejects it with this text
            return FileRead(headers=(replace(header, frame_problem=frames),))
        return FileRead(headers=tuple(
            replace(header, frame=i, position=f.position, orientation=f.orientation or header.orientation,
                    pixel_spacing=f.pixel_spacing or header.pixel_spacing,
                    slice_thickness=f.slice_thickness or header.slice_thickness, rescale=f.rescale or header.rescale,
                    image_type=f.frame_type or header.image_type)
            for i, f in enumerate(frames)
        ))

    def source_bytes(self, series: Series) -> int:
        """The float32 stack plus the file's stored pixels, decoded whole (2 bytes a voxel) when uncompressed."""
        first = series.first
        voxels = (first.rows or 512) * (first.cols or 512) * len(series.slices)
        return 4 * voxels + 2 * voxels
