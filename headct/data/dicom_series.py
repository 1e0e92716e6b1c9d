"""DICOM series: find files by content, read headers only, group by UIDs, and load one series as HU.

Conventions (DICOM PS3.3 C.7.6.2): world coordinates are LPS mm (+x patient Left, +y Posterior, +z Superior).
Pixel (col, row) of a slice sits at  IPP + col * PixelSpacing[1] * IOP[:3] + row * PixelSpacing[0] * IOP[3:];
the slice normal is IOP[:3] x IOP[3:]. Slices are ordered by their position projected on that normal, never by
file name or InstanceNumber. RAS (+x Right, +y Anterior, +z Superior) = LPS with x and y negated.

Everything here is header-only except `load_hu`, which reads the pixels of the one series chosen per study.
Source paths and UIDs live in these objects for the local linkage file and terminal messages only.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import iter_pixels

from headct.data import multiframe
from headct.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


@dataclass(frozen=True)
class SliceHeader:
    """The header facts of one DICOM file that ingestion needs (no pixels)."""

    path: Path
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    image_type: tuple[str, ...]
    sop_class_uid: str
    rows: int | None
    cols: int | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines
    position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
    frames: int
    slice_thickness: float | None  # mm
    kernel: str
    kvp: float | None
    manufacturer: str
    body_part: str
    series_description: str
    contrast_agent: str
    sop_instance_uid: str = ""
    study_description: str = ""
    # (RescaleSlope, RescaleIntercept): HU = stored * slope + intercept; None when the file has neither
    rescale: tuple[float, float] | None = None
    # Stored values that mean "no data" (PixelPaddingValue .. PixelPaddingRangeLimit, inclusive), or None
    padding: tuple[int, int] | None = None
    frame: int = 0  # index of this slice's frame in its file (multi-frame objects hold one slice per frame)
    # why a multi-frame object could not be split into slices (no per-frame geometry), else ""
    frame_problem: str = ""
    transfer_syntax: str = ""  # TransferSyntaxUID of the file


@dataclass(frozen=True)
class Series:
    """All slices of one SeriesInstanceUID within one study, in file-name order (not slice order).

    A NIfTI file is one series of one slice header (`nifti` set: its shape and affine); see nifti_input.py.
    """

    study_uid: str
    series_uid: str
    slices: tuple[SliceHeader, ...]
    nifti: Any = None  # headct.data.nifti_input.NiftiInfo for a NIfTI file, else None

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]


@dataclass(frozen=True)
class Discovery:
    headers: list[SliceHeader]
    bad_files: list[tuple[Path, str]]  # (path, why): for the user's terminal only
    other_files: int  # files that are not DICOM by content (e.g. a reads.csv beside the series)
    niftis: list[Any] = field(default_factory=list)  # headct.data.nifti_input.NiftiInfo, one per file
    index_files: int = 0  # DICOMDIR media indexes: recognised and skipped (the images they list are read directly)


# ----------------------------------------------------------------------------------------------- discovery
def list_files(src: Path) -> list[Path]:
    """Every file under `src`, recursively, in a deterministic order; linked folders are followed once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already walked: stop the cycle
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(folder) / name for name in sorted(files))
    return found


def has_dicom_preamble(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 magic `DICM` at byte 128 (content, not extension)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_headers(paths: list[Path]) -> Discovery:
    """Read the headers (stop_before_pixels) of `paths`; NIfTI files by name (.nii, .nii.gz) and nibabel's lazy
    header; non-DICOM files are counted, DICOMDIR indexes counted apart, broken ones listed."""
    from headct.data import nifti_input  # nibabel only when a worker meets a NIfTI file

    headers, bad, niftis, other, index = [], [], [], 0, 0
    for path in paths:
        try:
            if nifti_input.is_nifti_name(path):
                niftis.append(nifti_input.read_info(path))
                continue
            if not has_dicom_preamble(path):
                if path.suffix.lower() == ".dcm":
                    bad.append((path, "named .dcm but has no DICM preamble"))
                else:
                    other += 1
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
                index += 1
                continue
            found = _slice_headers(path, ds)
        except Exception as exc:  # any parse failure of one file is reported by name; the run goes on
            kind = "NIfTI" if nifti_input.is_nifti_name(path) else "DICOM header"
            bad.append((path, f"unreadable {kind} ({type(exc).__name__}: {exc})"))
            continue
        if isinstance(found, str):
            bad.append((path, found))
        else:
            headers.extend(found)
    return Discovery(headers, bad, other, niftis, index)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _rescale(ds: pydicom.Dataset) -> tuple[float, float] | None:
    slope, intercept = _float(ds, "RescaleSlope"), _float(ds, "RescaleIntercept")
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


def _slice_headers(path: Path, ds: pydicom.Dataset) -> list[SliceHeader] | str:
    """One header per slice (one per frame of a multi-frame object), or why the file cannot be placed."""
    header = _slice_header(path, ds)
    if isinstance(header, str) or header.frames <= 1:
        return header if isinstance(header, str) else [header]
    frames = multiframe.frame_facts(ds)
    if isinstance(frames, str):  # e.g. a multi-frame secondary capture: QC rejects it with this text
        return [replace(header, frame_problem=frames)]
    return [
        replace(header, frame=i, position=f.position, orientation=f.orientation or header.orientation,
                pixel_spacing=f.pixel_spacing or header.pixel_spacing,
                slice_thickness=f.slice_thickness or header.slice_thickness, rescale=f.rescale or header.rescale,
                image_type=f.frame_type or header.image_type)
        for i, f in enumerate(frames)
    ]


def _slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader | str:
    """The header facts, or a string saying why the file cannot be placed in a series."""
    study_uid, series_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return "no StudyInstanceUID/SeriesInstanceUID"
    rows, cols = ds.get("Rows"), ds.get("Columns")
    shared = multiframe.shared_item(ds)  # Enhanced CT keeps kernel and kVp in functional groups
    return SliceHeader(
        path=path,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(t.upper() for t in _text(ds, "ImageType").split("\\") if t),
        sop_class_uid=_text(ds, "SOPClassUID"),
        rows=int(rows) if rows is not None else None,
        cols=int(cols) if cols is not None else None,
        pixel_spacing=multiframe.floats(ds, "PixelSpacing", 2),
        orientation=multiframe.floats(ds, "ImageOrientationPatient", 6),
        position=multiframe.floats(ds, "ImagePositionPatient", 3),
        frames=int(ds.get("NumberOfFrames") or 1),
        slice_thickness=_float(ds, "SliceThickness"),
        kernel=_text(ds, "ConvolutionKernel") or multiframe.nested_text(shared, "CTReconstructionSequence",
                                                                       "ConvolutionKernel"),
        kvp=_float(ds, "KVP") or multiframe.nested_float(shared, "CTXRayDetailsSequence", "KVP"),
        manufacturer=_text(ds, "Manufacturer"),
        body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        contrast_agent=_text(ds, "ContrastBolusAgent"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_description=_text(ds, "StudyDescription"),
        rescale=_rescale(ds),
        padding=_padding(ds),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
    )


def drop_repeated_instances(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[Path, Path]]]:
    """Keep one copy of each (series, SOPInstanceUID, frame): the same instance exported twice (e.g. two
    copies of a folder) would otherwise read as two slices at one position. Returns the kept headers and
    (dropped, kept) path pairs for the terminal. Headers must be in path order (the first path is kept)."""
    kept, dropped, first = [], [], {}
    for header in headers:
        if not header.sop_instance_uid:
            kept.append(header)
            continue
        key = (header.study_uid, header.series_uid, header.sop_instance_uid, header.frame)
        if key in first:
            if first[key] != header.path:
                dropped.append((header.path, first[key]))
            continue
        first[key] = header.path
        kept.append(header)
    return kept, dropped


def group_series(headers: list[SliceHeader]) -> list[Series]:
    """Group slices by (StudyInstanceUID, SeriesInstanceUID); deterministic order."""
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[(header.study_uid, header.series_uid)].append(header)
    return [
        Series(study, series, tuple(sorted(groups[(study, series)], key=lambda h: str(h.path))))
        for study, series in sorted(groups)
    ]


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class StackGeometry:
    """Geometry of a single-frame axial stack, slices in position order.

    Source voxel index (col, row, k) -> array element hu[k, row, col] of `load_hu`'s (N, rows, cols) array.
    """

    row_dir: np.ndarray  # (3,) LPS unit vector of increasing column index
    col_dir: np.ndarray  # (3,) LPS unit vector of increasing row index
    normal: np.ndarray  # (3,) row_dir x col_dir
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    positions: np.ndarray  # (N, 3) LPS IPP in stack order
    along: np.ndarray  # (N,) positions projected on the normal, mm, strictly ascending after QC
    order: tuple[int, ...]  # stack position -> index into Series.slices
    rows: int
    cols: int

    @property
    def n_slices(self) -> int:
        return len(self.order)

    @property
    def steps_mm(self) -> np.ndarray:
        return np.diff(self.along)

    @property
    def step_mm(self) -> float:
        return float(np.median(self.steps_mm)) if self.n_slices > 1 else 0.0

    @property
    def coverage_mm(self) -> float:
        return float(self.along[-1] - self.along[0])

    @property
    def tilt_deg(self) -> float:
        """Angle between the slice normal and the direction the slices advance (gantry tilt shows here)."""
        advance = self.positions[-1] - self.positions[0]
        norm = np.linalg.norm(advance)
        if norm == 0:
            return 0.0
        return float(np.degrees(np.arccos(np.clip(abs(advance @ self.normal) / norm, 0.0, 1.0))))

    def ras_of_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """(M, 3) RAS mm of voxels (col, row, k) with integer k, using each slice's own position."""
        rs, cs = self.pixel_spacing
        k = voxels[:, 2].astype(int)
        lps = self.positions[k] + voxels[:, :1] * cs * self.row_dir + voxels[:, 1:2] * rs * self.col_dir
        return lps * LPS_TO_RAS.diagonal()[:3]

    def source_coords(self, lps: np.ndarray) -> np.ndarray:
        """(3, M) fractional array indices (k, row, col) into `load_hu`'s stack of LPS mm points (M, 3).

        Uses the true slice positions, so uneven spacing, gantry tilt (positions advancing at an angle to the
        normal) and in-plane table shifts all land right: a point's height along the normal gives its fractional
        slice k between the two slices that bracket it; the slice origin at k is interpolated between those two
        slices' ImagePositionPatient; the in-plane offset from that origin gives (row, col). Points beyond the
        first or last slice get k = -2 (outside, so they read as padding).
        """
        n = self.n_slices
        height = lps @ self.normal
        k = np.interp(height, self.along, np.arange(n, dtype=float))
        k[(height < self.along[0] - 1e-6) | (height > self.along[-1] + 1e-6)] = -2.0
        inside = np.clip(k, 0, n - 1)
        origin = np.stack([np.interp(inside, np.arange(n), self.positions[:, d]) for d in range(3)], axis=1)
        offset = lps - origin
        rs, cs = self.pixel_spacing
        return np.stack([k, offset @ self.col_dir / rs, offset @ self.row_dir / cs])


def stack_geometry(series: Series) -> StackGeometry:
    """Geometry of a series whose slices share orientation, spacing and size (checked by selection QC)."""
    first = series.first
    iop = np.asarray(first.orientation, float)
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    positions = np.asarray([s.position for s in series.slices], float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    return StackGeometry(
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        pixel_spacing=first.pixel_spacing,
        positions=positions[order],
        along=along[order],
        order=tuple(int(i) for i in order),
        rows=first.rows,
        cols=first.cols,
    )


# --------------------------------------------------------------------------------------------------- pixels
class PixelDataError(InputError):
    """A file of the chosen series whose pixels cannot be turned into HU.

    str(exc) names the file (terminal only); `why` carries no path or UID (for rejects.csv).
    """

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def load_hu(series: Series, geometry: StackGeometry, pad_hu: float = -1024.0) -> np.ndarray:
    """(N, rows, cols) float32 HU in stack order.

    HU = stored * RescaleSlope + RescaleIntercept per slice (per frame for Enhanced CT), computed in float32
    one slice at a time (no float64 copy of the stack). Stored values inside the pixel-padding range are set to
    `pad_hu` first (air), so the outside of the reconstruction circle (often -2000 or -3024 HU) never blends
    into the head when resampled. Compressed transfer syntaxes are decoded by pydicom's pixel plugins
    (pylibjpeg: JPEG, JPEG-LS, JPEG 2000; RLE and deflate natively). Peak memory: this stack (4 bytes x rows x
    cols x slices) plus one file's decoded pixels (all frames of an uncompressed multi-frame object).
    """
    hu = np.empty((geometry.n_slices, geometry.rows, geometry.cols), np.float32)
    wanted: dict[Path, dict[int, int]] = defaultdict(dict)  # file -> frame -> stack position
    for k, index in enumerate(geometry.order):
        header = series.slices[index]
        wanted[header.path][header.frame] = k
    for path, frames in wanted.items():
        header = series.slices[geometry.order[next(iter(frames.values()))]]
        if header.rescale is None:
            raise PixelDataError(path, "no RescaleSlope/RescaleIntercept, so HU cannot be derived")
        ds = pydicom.Dataset()  # filled with the file's non-pixel elements by iter_pixels
        indices = sorted(frames) if header.frames > 1 else None
        try:
            # iter_pixels reads pixel data straight from the file, except from a deflated one (the whole dataset
            # is zlib-compressed): that is inflated by dcmread first
            source = pydicom.dcmread(path) if header.transfer_syntax == _DEFLATED else path
            for frame, stored in zip(indices or [0], iter_pixels(source, ds_out=ds, indices=indices), strict=True):
                if stored.shape != (geometry.rows, geometry.cols):
                    raise PixelDataError(path, f"pixel array {stored.shape} differs from Rows/Columns of the series")
                k = frames[frame]
                slope, intercept = series.slices[geometry.order[k]].rescale or header.rescale
                hu[k] = stored
                hu[k] *= np.float32(slope)
                hu[k] += np.float32(intercept)
                if header.padding is not None:
                    lo, hi = header.padding
                    hu[k][(stored >= lo) & (stored <= hi)] = pad_hu
        except PixelDataError:
            raise
        except Exception as exc:  # pydicom raises many types for undecodable data; all mean "unreadable"
            syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
            name = getattr(syntax, "name", "unknown transfer syntax")
            raise PixelDataError(path, f"pixel data could not be decoded ({type(exc).__name__}; {name})") from exc
    return hu


def content_sha256(hu: np.ndarray, geometry: StackGeometry) -> str:
    """sha256 of the HU stack laid out in the closest RAS orientation (so the same volume stored with flipped or
    swapped axes, e.g. a DICOM series and its NIfTI conversion, hashes alike), with its shape."""
    from nibabel.orientations import apply_orientation, io_orientation

    axes = np.stack([geometry.row_dir, geometry.col_dir, geometry.normal], axis=1) * LPS_TO_RAS.diagonal()[:3, None]
    view = apply_orientation(hu.transpose(2, 1, 0), io_orientation(np.vstack([np.c_[axes, np.zeros(3)],
                                                                               [0, 0, 0, 1]])))
    digest = hashlib.sha256(str(view.shape).encode())
    for k in range(view.shape[2]):  # one contiguous slice at a time: no copy of the whole stack
        digest.update(np.ascontiguousarray(view[:, :, k]).data)
    return digest.hexdigest()
