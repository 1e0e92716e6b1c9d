"""A real adult head CT for tests and benchmarks: fetched at run time, never committed (GPL-2 data).

Source (shared/REFERENCE.md section 5): the Debian package `invesalius-examples`, file
`usr/share/doc/invesalius-examples/examples/Cranium.inv3`, a gzip tar holding `main.plist` (matrix shape (z, y, x),
dtype, spacing (x, y, z) mm) and `matrix.dat` (raw C-order int16, plain HU). Checked by looking at the data
(sagittal and axial views): z index 0 is inferior (skull base, maxilla) and the vertex is at the top; the row
index runs posterior -> anterior (the nose, teeth and sinuses are at high rows, the head holder's arc at low rows).
Left/right cannot be told from this symmetric anatomy; columns are taken to run toward the patient's Left, the
usual DICOM display convention.

`cranium()` fetches the package with `apt-get download` into a cache folder ($HEADCT_TEST_CACHE, default
`~/.cache/headct/invesalius`), runs `apt-get update` once and retries only when running as root, and unpacks with
`dpkg -x`. Anything that stops it raises `Unavailable` with the reason. `for_tests()` is what a pytest fixture
calls: outside CI it skips with that reason; in CI (the environment variable CI set, as `.ci/run` does) it FAILS
with it, so CI can never pass without the real-anatomy checks. `python tests/real_ct.py` fetches it (`.ci/run`
does, before the tests) and prints where it is or why it cannot be had (exit 1).

Writers: `write_dicom_series` (one CT Image Storage file per slice, unsigned storage with RescaleIntercept -1024,
standard axial orientation: image rows run anterior -> posterior, columns right -> left; fake non-identifying
patient tags) and `write_nifti` (the same voxels in the same world position, LAS array order as a converter
would write it). Both place the volume identically in patient space, so ingesting either must give one volume.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "invesalius-examples"
MEMBER = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
CACHE_ENV = "HEADCT_TEST_CACHE"
CI_ENV = "CI"  # set by CI services and by .ci/run: the real CT is then required, not optional
HU_MIN = -1024  # the scanner's air floor in this volume; stored value = HU + 1024 (unsigned storage)

# Fake, non-identifying header values (none is a real person, institution or record).
FAKE_PATIENT = {
    "PatientName": "Testcase^Cranium",
    "PatientID": "HEADCT-REALCT-0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "AccessionNumber": "ACC-REALCT-0001",
    "InstitutionName": "Nowhere Test Hospital",
    "ReferringPhysicianName": "Nobody^Test",
}


class Unavailable(RuntimeError):
    """The real CT cannot be had here (no apt, no network, a broken package); the message says why."""


@dataclass(frozen=True)
class RealCT:
    """The volume as stored in Cranium.inv3: hu[z, y, x] int16 HU; z inferior -> superior, y posterior ->
    anterior, x toward the patient's left. spacing = (x, y, z) mm."""

    hu: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return x, y, z

    def origin_lps(self) -> np.ndarray:
        """LPS mm of the first DICOM pixel (col 0, row 0) of the inferior slice: the volume centred in x and
        y, z starting at an arbitrary table position."""
        nx, ny, _ = self.shape_xyz
        sx, sy, _ = self.spacing
        return np.array([-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, -60.0])


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "headct" / "invesalius")


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def fetch_inv3(cache: Path | None = None) -> Path:
    """Path of Cranium.inv3 in the cache, downloading and unpacking the Debian package first if needed."""
    cache = cache or cache_dir()
    target = cache / "root" / MEMBER
    if target.is_file():
        return target
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` not found: the real head CT comes from the Debian package {PACKAGE}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        try:
            proc = _run(["apt-get", "download", PACKAGE], work)
            if proc.returncode != 0 and os.geteuid() == 0:  # the package lists may be missing or stale
                _run(["apt-get", "update", "-qq"], work)
                proc = _run(["apt-get", "download", PACKAGE], work)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`apt-get download {PACKAGE}` timed out (no network?)") from None
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise Unavailable(f"`apt-get download {PACKAGE}` failed: {_tail(proc)}")
        unpacked = work / "root"
        proc = _run(["dpkg", "-x", str(debs[-1]), str(unpacked)], work)
        if proc.returncode != 0 or not (unpacked / MEMBER).is_file():
            raise Unavailable(f"`dpkg -x` of {debs[-1].name} did not give {MEMBER}: {_tail(proc)}")
        if not target.is_file():  # another process may have finished first; either copy is the same
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(unpacked / MEMBER, target)
    return target


def read_inv3(path: Path) -> RealCT:
    """Volume and spacing of an InVesalius project file (gzip tar: main.plist + matrix.dat)."""
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise Unavailable(f"{path.name} holds no main.plist")
        main = plistlib.load(tar.extractfile(members["main.plist"]))
        matrix = main["matrix"]
        shape, dtype = tuple(int(n) for n in matrix["shape"]), np.dtype(matrix["dtype"]).newbyteorder("<")
        raw = tar.extractfile(members[matrix["filename"]]).read()
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise Unavailable(f"{matrix['filename']} has {len(raw)} bytes, not {shape} x {dtype}")
    hu = np.frombuffer(raw, dtype).reshape(shape).astype(np.int16)
    spacing = tuple(float(s) for s in main["spacing"])
    return RealCT(hu=hu, spacing=spacing)


def cranium(cache: Path | None = None) -> RealCT:
    """The real head CT (fetched on first use); raises Unavailable with the reason when it cannot be had."""
    return read_inv3(fetch_inv3(cache))


def in_ci() -> bool:
    """True when the environment variable CI is set to anything but empty, 0, false or no (CI services set it)."""
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


def for_tests() -> RealCT:
    """`cranium()` for a pytest fixture: skips with the reason when the CT cannot be had, but fails in CI."""
    import pytest

    try:
        return cranium()
    except Unavailable as exc:
        reason = f"real head CT (Debian package {PACKAGE}) unavailable: {exc}"
        if in_ci():
            pytest.fail(f"{reason}; {CI_ENV} is set, and CI must run the real-anatomy checks (.ci/run fetches the "
                        "package before the tests)", pytrace=False)
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------- writers
def write_dicom_series(ct: RealCT, folder: Path, *, study_uid: str | None = None, series_uid: str | None = None,
                       patient: dict[str, str] | None = None) -> list[Path]:
    """One CT Image Storage file per axial slice under `folder` (files `IM<instance>`, no extension).

    Standard axial orientation (IOP 1\\0\\0\\0\\1\\0): image rows run anterior -> posterior, so the stored rows are
    flipped against the .inv3's posterior -> anterior order. InstanceNumber 1 is the most superior slice (as
    many scanners number them) while IPP z grows superiorly, so file order and slice order disagree.
    Unsigned 12-bit storage with RescaleSlope 1 and RescaleIntercept -1024.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sx, sy, sz = ct.spacing
    origin = ct.origin_lps()
    nz = ct.hu.shape[0]
    stored = np.clip(ct.hu.astype(np.int32) - HU_MIN, 0, 4095).astype(np.uint16)[:, ::-1, :]  # rows A -> P
    paths = []
    for k in range(nz):
        instance = nz - k  # 1 = most superior
        ds = _base_dataset(patient or FAKE_PATIENT)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = instance
        position = origin + np.array([0.0, 0.0, k * sz])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.PixelSpacing = [f"{sy:.7f}", f"{sx:.7f}"]  # (between rows, between columns)
        ds.SliceThickness = f"{sz:g}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"IM{instance:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _base_dataset(patient: dict[str, str]):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate, ds.StudyTime = "20000101", "120000"
    ds.StudyDescription, ds.SeriesDescription = "HEAD WO CONTRAST", "HEAD 1.5 STANDARD"
    ds.StudyID, ds.SeriesNumber = "1", 2
    ds.Manufacturer, ds.ManufacturerModelName = "TESTVENDOR", "TESTSCANNER"
    ds.BodyPartExamined, ds.KVP, ds.ConvolutionKernel = "HEAD", "120", "H30s"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", f"{HU_MIN}", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "80"
    return ds


def affine_ras(ct: RealCT) -> np.ndarray:
    """4x4 voxel (x, y, z) of the .inv3 order -> RAS mm, the same patient position `write_dicom_series` gives."""
    sx, sy, sz = ct.spacing
    origin = ct.origin_lps()
    ny = ct.hu.shape[1]
    # DICOM row r = ny - 1 - y runs posterior in LPS (+y); RAS negates x and y.
    affine = np.diag([-sx, sy, sz, 1.0])
    affine[:3, 3] = [-origin[0], -(origin[1] + (ny - 1) * sy), origin[2]]
    return affine


def write_nifti(ct: RealCT, path: Path) -> Path:
    """The same volume as NIfTI (int16 HU, array axes (x, y, z), LAS), world position as the DICOM series."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(ct.hu.transpose(2, 1, 0))  # (z, y, x) -> (x, y, z)
    image = nib.Nifti1Image(data, affine_ras(ct))
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine_ras(ct), code=1)
    image.set_sform(affine_ras(ct), code=1)
    nib.save(image, path)
    return path


if __name__ == "__main__":  # `python tests/real_ct.py`: fetch into the cache (used by .ci/run)
    import sys

    try:
        print(f"real head CT: {fetch_inv3()}")
    except Unavailable as exc:
        sys.exit(f"real head CT (Debian package {PACKAGE}) unavailable: {exc}")
