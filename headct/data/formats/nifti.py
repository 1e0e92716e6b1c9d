"""NIfTI (`.nii`, `.nii.gz`, recognised by name: nibabel picks its reader by extension): one file is one series.

Identity: a NIfTI file has no UIDs, so its series and study key is `nifti:<path relative to SRC>` (turned into
`ser_`/`stu_` pseudonyms like any UID; one file = one study, since a folder of NIfTI files is usually many
patients). Its patient key is its own path (patient_key_source "self"), or with `patient_key: cq500_folder`
the first word of its top folder under SRC (or of its file name when it lies directly in SRC).

Geometry: the voxel -> RAS mm affine nibabel reads (sform, else qform) is reordered to the closest RAS
orientation (nibabel's `io_orientation`), so the third array axis is the one nearest the head-foot axis and
plays the role of the slice axis; the voxel (col, row, k) of that array then maps exactly like a DICOM stack's,
with a sheared third axis (uncorrected gantry tilt) read as per-slice positions.
HU: the stored values with the header's scl_slope/scl_inter applied (nibabel's convention: no scaling when they
are 0 or NaN), in float32 slice by slice; data that cannot be read is `unreadable`, a NaN or infinite value
anywhere `not_finite` (every voxel is checked, slice by slice as it is scaled), a volume whose values do not
look like HU `not_hu` (headct.data.formats.hu: the test every format's volume passes); an axis longer than
headct.data.header_checks.MAX_MATRIX is `too_large`.
nibabel is imported only when a NIfTI file is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headct.config.data import QcRules
from headct.data import header_checks
from headct.data.criteria import Criteria
from headct.data.formats.base import FileRead, InputFormat, Probe, SourceDataError
from headct.data.formats.hu import AIR_BELOW_HU, BRIGHT_BELOW_HU, NotHuError, check_hu  # noqa: F401 (its API)
from headct.data.qc import QcResult
from headct.data.series import LPS_TO_RAS, Series, SliceHeader, StackGeometry

_SUFFIXES = (".nii", ".nii.gz")


class NotFiniteError(SourceDataError):
    """A NaN or infinite value in the volume (reason `not_finite`)."""

    reason = "not_finite"


@dataclass(frozen=True)
class NiftiInfo:
    """Header facts of one NIfTI file (SliceHeader.extra; picklable: returned from discovery workers)."""

    shape: tuple[int, ...]
    affine: tuple[float, ...]  # 16 floats, row-major: voxel index -> RAS mm as stored
    synthetic: bool = False  # its `descrip` is headct synth's marker (headct/data/synth/marker.py)


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(_SUFFIXES)


def series_key(relative: Path) -> str:
    """The study and series key of a NIfTI file: its path under SRC without the extension."""
    rel = relative.as_posix()
    return "nifti:" + (rel[: -len(".gz")] if rel.endswith(".gz") else rel)[: -len(".nii")]


def read_info(path: Path) -> NiftiInfo:
    """Header only (nibabel loads lazily); raises what nibabel raises for a broken file."""
    import nibabel as nib

    from headct.data.synth.marker import VALUE

    image = nib.load(path)
    descrip = image.header.get("descrip") if hasattr(image.header, "get") else None  # NIfTI-1/2 only
    synthetic = descrip is not None and bytes(np.asarray(descrip).item()).rstrip(b"\0") == VALUE.encode()
    return NiftiInfo(tuple(int(s) for s in image.shape), tuple(float(v) for v in np.ravel(image.affine)), synthetic)


def _orientation(info: NiftiInfo) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(ornt, affine of the reoriented array, reoriented shape) for the closest RAS orientation."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    shape = info.shape[:3]
    affine = np.asarray(info.affine, float).reshape(4, 4)
    ornt = io_orientation(affine)
    reoriented = affine @ inv_ornt_aff(ornt, shape)
    new_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    return ornt, reoriented, new_shape


def shape_problem(info: NiftiInfo) -> str | None:
    """Why the file is not one 3D volume (reason `not_3d`), or None."""
    shape = info.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"NIfTI of shape {list(info.shape)}: one 3D volume expected (4D series and 2D images are not read)"
    if min(shape) < 2:
        return f"NIfTI of shape {list(info.shape)}: a single slice, not a volume"
    return None


def geometry(info: NiftiInfo) -> StackGeometry | str:
    """The stack geometry of the reoriented volume, or why the affine cannot be used."""
    _, affine, (cols, rows, n) = _orientation(info)
    flip = LPS_TO_RAS.diagonal()[:3]  # RAS <-> LPS: negate x and y
    i_axis, j_axis = affine[:3, 0] * flip, affine[:3, 1] * flip
    cs, rs = float(np.linalg.norm(i_axis)), float(np.linalg.norm(j_axis))
    if min(cs, rs) < 1e-6 or not np.isfinite(affine).all():
        return "NIfTI affine is degenerate (zero or non-finite voxel size)"
    row_dir, col_dir = i_axis / cs, j_axis / rs
    if abs(row_dir @ col_dir) > 1e-3:
        return "NIfTI affine shears the in-plane axes (not a stack of rectangular slices)"
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    positions = (affine[:3, :3] @ np.stack([np.zeros(n), np.zeros(n), np.arange(n)]) + affine[:3, 3:]).T * flip
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    return StackGeometry(row_dir=row_dir, col_dir=col_dir, normal=normal, pixel_spacing=(rs, cs),
                         positions=positions[order], along=along[order], order=tuple(int(i) for i in order),
                         rows=rows, cols=cols)


def load_hu(series: Series, geometry: StackGeometry) -> np.ndarray:
    """(N, rows, cols) float32 HU in stack order, like the DICOM reader's.

    Peak memory: the stored array (decompressed, its own dtype) plus the float32 stack.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    info: NiftiInfo = series.first.extra
    path = series.first.path
    try:
        proxy = nib.load(path).dataobj
        stored = np.asanyarray(proxy.get_unscaled())
    except Exception as exc:  # truncated or corrupt gzip, short file: nibabel raises several types
        raise SourceDataError(path, f"NIfTI data could not be read ({type(exc).__name__})") from exc
    if stored.ndim == 4:
        stored = stored[..., 0]
    ornt, _, _ = _orientation(info)
    stored = apply_orientation(stored, ornt)  # flips and transposes: views, no copy
    slope = np.float32(1.0 if proxy.slope is None else proxy.slope)
    inter = np.float32(0.0 if proxy.inter is None else proxy.inter)
    hu = np.empty((geometry.n_slices, geometry.rows, geometry.cols), np.float32)
    for k, index in enumerate(geometry.order):
        hu[k] = stored[:, :, index].T  # (cols, rows) -> (rows, cols)
        hu[k] *= slope
        hu[k] += inter
        if not np.isfinite(hu[k]).all():  # every voxel, one slice of booleans at a time
            raise NotFiniteError(path, f"NaN or infinite values (slice {k + 1} of {geometry.n_slices} in stack "
                                       "order); not a CT volume in HU")
    check_hu(hu, path)
    return hu


class NiftiFormat(InputFormat):
    name = "nifti"
    source_format = "nifti"
    label = "NIfTI"

    def claims(self, probe: Probe) -> bool:
        return is_nifti_name(probe.path)

    def read(self, probe: Probe) -> FileRead:
        key, info = series_key(probe.relative), read_info(probe.path)
        return FileRead(headers=(SliceHeader(
            path=probe.path, study_uid=key, series_uid=key, patient_id="", modality="CT", image_type=(),
            sop_class_uid="", rows=None, cols=None, pixel_spacing=None, orientation=None, position=None,
            frames=1, slice_thickness=None, kernel="", kvp=None, manufacturer="", body_part="",
            series_description="", contrast_agent="", format=self.name, extra=info, synthetic=info.synthetic,
        ),))

    def header_qc(self, series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | StackGeometry:
        """One 3D volume (`not_3d`), no criteria CSV (it has no DICOM header to match), a usable affine."""
        if len(series.slices) > 1:  # x.nii beside x.nii.gz: one key, two files
            return QcResult("inconsistent_geometry", f"{len(series.slices)} NIfTI files share one name (.nii and "
                                                     ".nii.gz): which one is the series is unknown")
        info: NiftiInfo = series.first.extra
        problem = shape_problem(info)
        if problem:
            return QcResult("not_3d", problem)
        large = header_checks.too_large([info.shape[:3]])
        if large is not None:
            return large
        if criteria is not None:
            return QcResult("criteria", "a NIfTI file has no DICOM header to match against criteria_csv")
        found = geometry(info)
        return QcResult("inconsistent_geometry", found) if isinstance(found, str) else found

    def load_hu(self, series: Series, geometry: StackGeometry, pad_hu: float) -> np.ndarray:
        return load_hu(series, geometry)

    def patient_key(self, series: Series, mode: str, src: Path) -> tuple[str | None, str]:
        """The file itself ("self"), or with `cq500_folder` the first word of its top folder under SRC, or of
        its file name when it lies directly in SRC ("dataset")."""
        if mode == "cq500_folder":
            path = series.first.path
            parts = path.relative_to(src).parts
            words = (parts[0] if len(parts) > 1 else path.name.split(".")[0]).split()
            if words:
                return words[0], "dataset"
        return series.series_uid, "self"

    def source_bytes(self, series: Series) -> int:
        """The float32 stack plus the stored array, read whole (counted at 2 bytes a voxel)."""
        voxels = 1
        for size in series.first.extra.shape[:3]:
            voxels *= int(size)
        return 4 * voxels + 2 * voxels
