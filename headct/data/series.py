"""The format-neutral series model: slice headers, series, and the geometry of a stack of slices.

Every input format (headct.data.formats) describes what it found as `SliceHeader`s (header facts, no pixels);
discovery groups them into `Series`; QC turns a series into a `StackGeometry`; resampling reads the geometry
only. Nothing here reads a file or imports a format library (no pydicom, no nibabel).

Conventions (DICOM PS3.3 C.7.6.2, used by every format): world coordinates are LPS mm (+x patient Left,
+y Posterior, +z Superior). Pixel (col, row) of a slice sits at
    position + col * pixel_spacing[1] * orientation[:3] + row * pixel_spacing[0] * orientation[3:]
and the slice normal is orientation[:3] x orientation[3:]. Slices are ordered by their position projected on that
normal, never by file name or instance number. RAS (+x Right, +y Anterior, +z Superior) = LPS with x and y negated.

Source paths and UIDs live in these objects for the local linkage file and terminal messages only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, slots=True)  # slots: no per-instance __dict__, 0.8 KB less per slice (750,000 in RSNA)
class SliceHeader:
    """The header facts of one slice (one file, or one frame of a multi-frame file) that ingestion needs.

    The fields speak DICOM's vocabulary, the lingua franca of CT; a format fills what it knows and leaves the
    rest at their empty values (a NIfTI file knows no kernel). `format` names the registered input format that
    read it (headct.data.formats), `extra` holds that format's own picklable facts (e.g. a NIfTI's shape and
    affine), which nothing else interprets.
    """

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
    orientation: tuple[float, ...] | None  # six direction cosines (ImageOrientationPatient)
    position: tuple[float, float, float] | None  # LPS mm of the first pixel (ImagePositionPatient)
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
    # (slope, intercept): HU = stored * slope + intercept; None when the file has neither
    rescale: tuple[float, float] | None = None
    # Stored values that mean "no data" (PixelPaddingValue .. PixelPaddingRangeLimit, inclusive), or None
    padding: tuple[int, int] | None = None
    frame: int = 0  # index of this slice's frame in its file (multi-frame files hold one slice per frame)
    # why a multi-frame object could not be split into slices (no per-frame geometry), else ""
    frame_problem: str = ""
    transfer_syntax: str = ""  # DICOM TransferSyntaxUID of the file
    # bytes the file's PixelData holds (0: no PixelData) and the bytes Rows x Columns x frames x samples x
    # BitsAllocated needs; None where the format cannot tell (compressed or deflated data, no DICOM)
    pixel_bytes: int | None = None
    pixel_bytes_needed: int | None = None
    # the input format that read this header; "dicom" (classic per-slice DICOM) for headers built by hand
    format: str = "dicom"
    extra: Any = None  # the format's own facts (picklable), e.g. headct.data.formats.nifti.NiftiInfo
    # written by `headct synth` (its marker: headct/data/synth/marker.py): only such data may use the demo key
    synthetic: bool = False
    # BitsStored and whether PixelRepresentation says signed (None: not given), for the wrap test of
    # headct.data.formats.hu (negative HU stored as two's complement in data declared unsigned)
    bits_stored: int | None = None
    pixel_signed: bool | None = None


@dataclass(frozen=True)
class Series:
    """All slices of one (study, series) key, in file-name order (not slice order); one format reads them all
    (`format`, the format of its first header)."""

    study_uid: str
    series_uid: str
    slices: tuple[SliceHeader, ...]

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def format(self) -> str:
        return self.first.format


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of a single-frame axial stack, slices in position order.

    Source voxel index (col, row, k) -> array element hu[k, row, col] of the (N, rows, cols) HU stack a format's
    `load_hu` returns.
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
        """(3, M) fractional array indices (k, row, col) into the HU stack of LPS mm points (M, 3).

        Uses the true slice positions, so uneven spacing, gantry tilt (positions advancing at an angle to the
        normal) and in-plane table shifts all land right: a point's height along the normal gives its fractional
        slice k between the two slices that bracket it; the slice origin at k is interpolated between those two
        slices' positions; the in-plane offset from that origin gives (row, col). Points beyond the
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
    """Geometry of a series whose slices share orientation, spacing and size (checked first: qc.stack_checks)."""
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
