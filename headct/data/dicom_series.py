"""DICOM series: find files by content, read headers only, group by UIDs, and load one series as HU.

Conventions (DICOM PS3.3 C.7.6.2): world coordinates are LPS mm (+x patient Left, +y Posterior, +z Superior).
Pixel (col, row) of a slice sits at  IPP + col * PixelSpacing[1] * IOP[:3] + row * PixelSpacing[0] * IOP[3:];
the slice normal is IOP[:3] x IOP[3:]. Slices are ordered by their position projected on that normal, never by
file name or InstanceNumber. RAS (+x Right, +y Anterior, +z Superior) = LPS with x and y negated.

Everything here is header-only except `load_hu`, which reads the pixels of the one series chosen per study.
Source paths and UIDs live in these objects for the local linkage file and terminal messages only.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import pixel_array

from headct.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image


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


@dataclass(frozen=True)
class Series:
    """All files of one SeriesInstanceUID within one study, in file-name order (not slice order)."""

    study_uid: str
    series_uid: str
    slices: tuple[SliceHeader, ...]

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]


@dataclass(frozen=True)
class Discovery:
    headers: list[SliceHeader]
    bad_files: list[tuple[Path, str]]  # (path, why): for the user's terminal only
    other_files: int  # files that are not DICOM by content (e.g. a reads.csv beside the series)


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
    """Read the headers (stop_before_pixels) of `paths`; non-DICOM files are counted, broken ones listed."""
    headers, bad, other = [], [], 0
    for path in paths:
        try:
            if not has_dicom_preamble(path):
                if path.suffix.lower() == ".dcm":
                    bad.append((path, "named .dcm but has no DICM preamble"))
                else:
                    other += 1
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY:
                other += 1
                continue
            header = _slice_header(path, ds)
        except Exception as exc:  # any parse failure of one file is reported by name; the run goes on
            bad.append((path, f"unreadable DICOM header ({type(exc).__name__}: {exc})"))
            continue
        if isinstance(header, str):
            bad.append((path, header))
        else:
            headers.append(header)
    return Discovery(headers, bad, other)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader | str:
    """The header facts, or a string saying why the file cannot be placed in a series."""
    study_uid, series_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return "no StudyInstanceUID/SeriesInstanceUID"
    rows, cols = ds.get("Rows"), ds.get("Columns")
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
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        frames=int(ds.get("NumberOfFrames") or 1),
        slice_thickness=_float(ds, "SliceThickness"),
        kernel=_text(ds, "ConvolutionKernel"),
        kvp=_float(ds, "KVP"),
        manufacturer=_text(ds, "Manufacturer"),
        body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        contrast_agent=_text(ds, "ContrastBolusAgent"),
    )


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

    def affine_ras(self) -> np.ndarray:
        """4x4 map from source voxel (col, row, k) to RAS mm; k advances linearly from first to last slice
        (so gantry tilt is a shear, not an error)."""
        rs, cs = self.pixel_spacing
        lps = np.eye(4)
        lps[:3, 0] = self.row_dir * cs
        lps[:3, 1] = self.col_dir * rs
        lps[:3, 2] = (self.positions[-1] - self.positions[0]) / max(self.n_slices - 1, 1)
        lps[:3, 3] = self.positions[0]
        return LPS_TO_RAS @ lps

    def ras_of_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """(M, 3) RAS mm of voxels (col, row, k) with integer k, using each slice's own position."""
        rs, cs = self.pixel_spacing
        k = voxels[:, 2].astype(int)
        lps = self.positions[k] + voxels[:, :1] * cs * self.row_dir + voxels[:, 1:2] * rs * self.col_dir
        return lps * LPS_TO_RAS.diagonal()[:3]

    @property
    def evenly_spaced(self) -> bool:
        """Every slice step within 1% of the median (then `affine_ras` alone maps voxels exactly enough)."""
        return bool(np.abs(self.steps_mm - self.step_mm).max() <= 0.01 * self.step_mm)

    def true_k(self, k_linear: np.ndarray) -> np.ndarray:
        """Slice index from the true slice positions, for the linear k of `affine_ras` (uneven spacing).

        Inside the stack, a point between two slices then lies between exactly those two; outside, k is
        left as it was (out of range, so it reads as padding).
        """
        n = self.n_slices
        k = np.array(k_linear, dtype=float, copy=True)
        inside = (k >= 0) & (k <= n - 1)
        along = self.along[0] + k[inside] * (self.coverage_mm / (n - 1))
        k[inside] = np.interp(along, self.along, np.arange(n))
        return k


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


def load_hu(series: Series, geometry: StackGeometry) -> np.ndarray:
    """(N, rows, cols) float32 HU in stack order: stored value * RescaleSlope + RescaleIntercept, per slice."""
    hu = np.empty((geometry.n_slices, geometry.rows, geometry.cols), np.float32)
    for k, index in enumerate(geometry.order):
        path = series.slices[index].path
        ds = pydicom.Dataset()  # filled with the file's non-pixel elements by pixel_array
        try:
            stored = pixel_array(path, ds_out=ds)
        except Exception as exc:  # pydicom raises many types for undecodable data; all mean "unreadable"
            syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
            name = getattr(syntax, "name", "unknown transfer syntax")
            raise PixelDataError(path, f"pixel data could not be decoded ({type(exc).__name__}; {name})") from exc
        if stored.shape != (geometry.rows, geometry.cols):
            raise PixelDataError(path, f"pixel array {stored.shape} differs from Rows/Columns of the series")
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is None or intercept is None:
            raise PixelDataError(path, "no RescaleSlope/RescaleIntercept, so HU cannot be derived")
        hu[k] = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return hu
