"""Classic DICOM: one file per slice, recognised by content (the Part 10 `DICM` preamble), whatever its name.

Headers are read with stop_before_pixels (one parse per file, shared with the Enhanced CT format through the
probe's memo); DICOMDIR media indexes are recognised and skipped (the images they list are found by the walk).
Slices are grouped by (StudyInstanceUID, SeriesInstanceUID) and ordered by position along the slice normal
(headct.data.series). Pixels are read only for the series chosen per study (`load_hu`, in
headct.data.formats.dicom_pixels), at the offset this parse found, without parsing the header again.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom

from headct.config.data import QcRules
from headct.data import header_checks, qc
from headct.data.criteria import Criteria
from headct.data.formats import dicom_pixels, dicom_values
from headct.data.formats.base import FileRead, InputFormat, Probe, top_folder_word
from headct.data.formats.dicom_pixels import (  # noqa: F401 - the pixel errors are part of this format's API
    NoPixelDataError,
    PixelDataError,
    PixelElement,
    load_hu,
)
from headct.data.formats.dicom_values import ascii_charset, floats, integer, number, text
from headct.data.qc import QcResult
from headct.data.series import Series, SliceHeader, StackGeometry, stack_geometry
from headct.data.synth import marker

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image
_DIRECTORY_RECORDS = 0x00041220  # DirectoryRecordSequence
_DEFLATED = dicom_pixels.DEFLATED  # Deflated Explicit VR Little Endian
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1-.7.4
_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
_DOSE_TEXT = re.compile(r"\bDOSE\b|PATIENT PROTOCOL|DOSE ?REPORT")
_PIXEL_DATA = (0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF  # encapsulated (compressed) pixel data: fragments, no total length
# Bytes a deflated file may inflate to: pydicom holds the inflated dataset whole, in discovery and pixel reads
# (a 512 x 512 x 600-frame int16 Enhanced CT is 300 MiB)
MAX_INFLATED = 512 * 2**20
_INFLATE_CHUNK = 4 * 2**20
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT")  # 4-byte length


# ------------------------------------------------------------------------------------------------- headers
def has_dicom_preamble(probe: Probe) -> bool:
    """True when the file carries the DICOM Part 10 magic `DICM` at byte 128 (content, not extension)."""
    head = probe.head
    return len(head) == 132 and head[128:132] == b"DICM"


def _parse(probe: Probe) -> tuple[pydicom.Dataset, int | None, PixelElement | None]:
    with open(probe.path, "rb") as fp:
        check_inflated_size(fp)
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        offset = fp.tell()
        head = fp.read(12)
        return ds, _pixel_data_bytes(head, ds), dicom_pixels.locate(fp, ds, offset, head)


class InflatesTooLarge(ValueError):
    """A deflated file whose data inflates beyond MAX_INFLATED: refused before pydicom inflates it whole."""


def check_inflated_size(fp: BinaryIO) -> None:
    """For a Deflated Explicit VR Little Endian file: inflate its dataset in chunks, keeping none, and raise
    InflatesTooLarge past MAX_INFLATED bytes. pydicom inflates the whole dataset into memory even to read the
    header (a 2 MB file of zeros can inflate to 2 GiB), so this bounds that allocation; memory here stays at one
    chunk. Other transfer syntaxes: nothing is read beyond the file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    if plainly_not_deflated(fp):
        return
    fp.seek(0)
    read_preamble(fp, False)
    if str(_read_file_meta_info(fp).get("TransferSyntaxUID", "")) != _DEFLATED:
        return
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while chunk := fp.read(_INFLATE_CHUNK):
        while chunk:
            total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
            if total > MAX_INFLATED:
                raise InflatesTooLarge(f"deflated data inflates beyond {MAX_INFLATED >> 20} MiB "
                                       "(formats.dicom.MAX_INFLATED); not read")
            chunk = inflater.unconsumed_tail


def plainly_not_deflated(fp: BinaryIO) -> bool:
    """True when the file meta group, read from its bytes (explicit VR little endian, led by its group length, as
    PS3.10 prescribes), names a transfer syntax that is not the deflated one: what pydicom's reading of the group
    would conclude, for a tenth of its time. False for anything else (pydicom then reads the group)."""
    fp.seek(132)
    head = fp.read(12)
    if len(head) < 12 or head[:8] != b"\x02\x00\x00\x00UL\x04\x00":
        return False
    group = fp.read(struct.unpack("<I", head[8:12])[0])
    if fp.read(2) == b"\x02\x00":  # the group goes on past its stated length: pydicom's reading does too
        return False
    syntax, at = None, 0
    while at + 8 <= len(group):
        tag, vr = struct.unpack("<HH", group[at : at + 4]), group[at + 4 : at + 6]
        if tag[0] != 2 or not vr.isalpha() or not vr.isupper():
            return False
        if vr in _LONG_VRS:
            if at + 12 > len(group):
                return False
            length, start = struct.unpack("<I", group[at + 8 : at + 12])[0], at + 12
        else:
            length, start = struct.unpack("<H", group[at + 6 : at + 8])[0], at + 8
        if tag[1] == 0x0010:
            syntax = group[start : start + length]
        at = start + length
    return at == len(group) and syntax is not None and _DEFLATED.encode() not in syntax


def _pixel_data_bytes(head: bytes, ds: pydicom.Dataset) -> int | None:
    """The length of the PixelData value, read from its element header `head` (the 12 bytes where the parse
    stopped: pydicom stops right before it): 0 when the parse reached the end of the file (no PixelData), None
    when it cannot be told (a deflated or big-endian file, encapsulated data, float pixel data)."""
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return None  # pydicom parsed an inflated copy: this file's position says nothing
    implicit, little = ds.original_encoding
    if not little:
        return None
    if len(head) < 8:
        return 0
    if struct.unpack("<HH", head[:4]) != _PIXEL_DATA:
        return None  # FloatPixelData / DoubleFloatPixelData
    if implicit:
        length = struct.unpack("<I", head[4:8])[0]
    elif head[4:6] in _LONG_VRS and len(head) == 12:
        length = struct.unpack("<I", head[8:12])[0]
    else:
        length = struct.unpack("<H", head[6:8])[0]
    return None if length == _UNDEFINED_LENGTH else int(length)


def dataset(probe: Probe) -> pydicom.Dataset:
    """The file's header without pixels, parsed once per file."""
    return probe.memo("dicom", lambda: _parse(probe))[0]


def pixel_data_bytes(probe: Probe) -> int | None:
    """Bytes of the file's PixelData (0: none; None: cannot be told), from the same parse as `dataset`."""
    return probe.memo("dicom", lambda: _parse(probe))[1]


def pixel_element(probe: Probe) -> PixelElement | None:
    """Where a single-frame file's pixel data starts and how it decodes (headct.data.formats.dicom_pixels)."""
    return probe.memo("dicom", lambda: _parse(probe))[2]


def pixel_bytes_needed(ds: pydicom.Dataset) -> int | None:
    """Rows x Columns x frames x SamplesPerPixel x BitsAllocated / 8 (bytes, rounded up), or None when a
    value is missing or not a number."""
    try:  # dicom_values.integer: the raw US / IS bytes where plain, else pydicom's value (None when absent)
        bits = int(integer(ds, "BitsAllocated")) * int(integer(ds, "Rows")) * int(integer(ds, "Columns")) * int(
            integer(ds, "NumberOfFrames") or 1) * int(integer(ds, "SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (bits + 7) // 8


def is_media_index(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return (meta is not None and text(meta, "MediaStorageSOPClassUID") == _MEDIA_DIRECTORY) or (
        _DIRECTORY_RECORDS in ds._dict)


def _rescale(ds: pydicom.Dataset) -> tuple[float, float] | None:
    slope, intercept = number(ds, "RescaleSlope"), number(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        return None
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _padding(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """PixelPaddingValue (0028,0120) and, when present, PixelPaddingRangeLimit (0028,0121): the stored values
    between them (inclusive) mark pixels outside the reconstructed field (PS3.3 C.7.5.1.1.2)."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):  # bytes: VR could not be resolved; ignore rather than guess
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    if isinstance(limit, bytes):
        limit = value
    return (int(min(value, limit)), int(max(value, limit)))


def is_synthetic(ds: pydicom.Dataset) -> bool:
    """True when the file carries `headct synth`'s private marker (headct/data/synth/marker.py).

    What `ds.get_private_item(GROUP, ELEMENT, CREATOR)` finds, without its cost: pydicom finds the private block
    by slicing the dataset (a copy of every element); here the creator elements (GROUP, 0x10-0xFF) are looked up
    directly, in the same tag order, and the first holding CREATOR gives the item's tag."""
    creators = sorted(int(t) for t in ds._dict if t >> 16 == marker.GROUP and 0x10 <= (t & 0xFFFF) < 0x100)
    block = next((t & 0xFF for t in creators if dicom_values.lo_value(ds, t) == marker.CREATOR), None)
    tag = None if block is None else marker.GROUP << 16 | block << 8 | marker.ELEMENT
    if tag is None or tag not in ds._dict:
        return False
    item = dicom_values.lo_value(ds, tag)
    value = item.decode("latin-1") if isinstance(item, bytes) else str(item)
    return value.strip() == marker.VALUE


def slice_header(path: Path, ds: pydicom.Dataset, fmt: str = "dicom") -> SliceHeader | str:
    """The header facts of the file's top level, or a string saying why it cannot be placed in a series."""
    plain = ascii_charset(ds)  # LO and SH values may be read from their bytes (headct.data.formats.dicom_values)
    study_uid, series_uid = text(ds, "StudyInstanceUID"), text(ds, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return "no StudyInstanceUID/SeriesInstanceUID"
    rows, cols = integer(ds, "Rows"), integer(ds, "Columns")
    return SliceHeader(
        path=path,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=text(ds, "PatientID", plain),
        modality=text(ds, "Modality").upper(),
        image_type=tuple(t.upper() for t in text(ds, "ImageType").split("\\") if t),
        sop_class_uid=text(ds, "SOPClassUID"),
        rows=int(rows) if rows is not None else None,
        cols=int(cols) if cols is not None else None,
        pixel_spacing=floats(ds, "PixelSpacing", 2),
        orientation=floats(ds, "ImageOrientationPatient", 6),
        position=floats(ds, "ImagePositionPatient", 3),
        frames=int(integer(ds, "NumberOfFrames") or 1),
        slice_thickness=number(ds, "SliceThickness"),
        kernel=text(ds, "ConvolutionKernel", plain),
        kvp=number(ds, "KVP") or None,
        manufacturer=text(ds, "Manufacturer", plain),
        body_part=text(ds, "BodyPartExamined"),
        series_description=text(ds, "SeriesDescription", plain),
        contrast_agent=text(ds, "ContrastBolusAgent", plain),
        sop_instance_uid=text(ds, "SOPInstanceUID"),
        study_description=text(ds, "StudyDescription", plain),
        rescale=_rescale(ds),
        padding=_padding(ds),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        format=fmt,
        synthetic=is_synthetic(ds),
        bits_stored=_int_or_none(integer(ds, "BitsStored")),
        pixel_signed=None if (sign := _int_or_none(integer(ds, "PixelRepresentation"))) is None else sign == 1,
    )


def _int_or_none(value: object) -> int | None:
    """A US value as an int, or None when absent or not one number (a malformed header is judged elsewhere)."""
    try:
        return None if value is None else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- QC
def _is_secondary_capture(sop_class_uid: str) -> bool:
    return sop_class_uid == _SECONDARY_CAPTURE or sop_class_uid.startswith(_SECONDARY_CAPTURE + ".")


def header_qc(series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | StackGeometry:
    """What a DICOM series is (dose report, screen capture, other modality, scout, unplaceable multi-frame,
    a single image), then the acquisition and stack checks (headct.data.qc), then its stack geometry."""
    first, slices = series.first, series.slices
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
    if len(slices) == 1:
        return QcResult("localizer", "a single image, not a volume")
    problem = (qc.acquisition_checks(series, rules, criteria) or qc.stack_checks(series, rules)
               or header_checks.value_checks(series) or header_checks.pixel_data_checks(series))
    return problem if problem is not None else stack_geometry(series)


# -------------------------------------------------------------------------------------------------- format
class DicomFormat(InputFormat):
    """Classic single-frame DICOM (multi-frame objects are claimed first by EnhancedCtFormat)."""

    name = "dicom"
    source_format = "dicom"
    label = "DICOM header"

    def claims(self, probe: Probe) -> bool:
        return has_dicom_preamble(probe) or probe.path.suffix.lower() == ".dcm"

    def read(self, probe: Probe) -> FileRead:
        if not has_dicom_preamble(probe):
            return FileRead(problem="named .dcm but has no DICM preamble")
        ds = dataset(probe)
        if is_media_index(ds):
            return FileRead(index=True)
        header = slice_header(probe.path, ds, self.name)
        if isinstance(header, str):
            return FileRead(problem=header)
        return FileRead(headers=(replace(header, pixel_bytes=pixel_data_bytes(probe),
                                         pixel_bytes_needed=pixel_bytes_needed(ds), extra=pixel_element(probe)),))

    def header_qc(self, series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | StackGeometry:
        return header_qc(series, rules, criteria)

    def load_hu(self, series: Series, geometry: StackGeometry, pad_hu: float) -> np.ndarray:
        return load_hu(series, geometry, pad_hu)

    def patient_key(self, series: Series, mode: str, src: Path) -> tuple[str | None, str]:
        """DICOM PatientID ("dicom"), or the first word of the top folder under SRC ("dataset", CQ500 layout)."""
        if mode == "dicom":
            return series.first.patient_id or None, "dicom"
        return top_folder_word(series.first.path, src), "dataset"

    def source_bytes(self, series: Series) -> int:
        """The float32 stack; a single-frame file decodes one slice at a time (negligible)."""
        first = series.first
        return 4 * (first.rows or 512) * (first.cols or 512) * len(series.slices)
