"""A hostile-input corpus for the ingest robustness tests (no pytest here): real files, written with pydicom and
nibabel, each broken the way hospital exports break. `write_corpus(src)` writes two valid series (a DICOM one
and a NIfTI one, each its own study) and one series per case of `CASES`, each its own study too, named `folder(case)`, and returns
{case name: the series key} (SeriesInstanceUID, or a NIfTI's `nifti:<path under SRC>` key) for the pseudonyms.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from dicom_factory import SeriesSpec, nifti_of, write_enhanced, write_series
from pydicom.uid import generate_uid

SMALL = SeriesSpec(n_slices=12, rows=40, cols=36, pixel_spacing=(4.0, 4.0))  # 55 mm of coverage: passes RULES
OTHER = SeriesSpec(n_slices=14, rows=40, cols=36, pixel_spacing=(4.0, 4.0))


def _dicom(src: Path, name: str, edit: Callable[[pydicom.Dataset, int], None], spec: SeriesSpec = SMALL) -> str:
    """A valid series under src/<name>/, then `edit(dataset, slice index)` applied to every file."""
    series_uid = generate_uid()
    paths = write_series(src / name, spec, patient_id=f"PID-{name}", series_uid=series_uid)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, k)
        ds.save_as(path)
    return series_uid


def _on_slice(k_target: int, change: Callable[[pydicom.Dataset], None]) -> Callable[[pydicom.Dataset, int], None]:
    return lambda ds, k: change(ds) if k == k_target else None


def _set(**values) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)
    return change


def _drop_pixels(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _nifti(src: Path, name: str, make: Callable[[Path], None]) -> str:
    path = src / f"{name}.nii.gz"
    make(path)
    return f"nifti:{name}"


def _nifti_with(value: float) -> Callable[[Path], None]:
    """A float32 NIfTI in HU with `value` at one voxel that a sampled check (every 4th voxel) never visits."""
    def make(path: Path) -> None:
        image = nifti_of(SMALL)  # in memory: dataobj holds the stored values, scl_slope/scl_inter not applied
        hu = np.asarray(image.dataobj, np.float32) * SMALL.slope + SMALL.intercept  # valid HU but for one voxel
        hu[1, 1, 5] = value
        nib.save(nib.Nifti1Image(hu, image.affine), path)
    return make


def _corrupt_gzip(path: Path) -> None:
    """A .nii.gz whose header reads but whose data stops half-way (a truncated copy)."""
    nib.save(nifti_of(SMALL), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])


def _huge_compressed(src: Path, name: str) -> str:
    """An RLE series whose header claims 65535 x 65535 (compressed data has no length to compare)."""
    return _dicom(src, name, lambda ds, k: _set(Rows=65535, Columns=65535)(ds),
                  SeriesSpec(**{**SMALL.__dict__, "transfer_syntax": "rle"}))


def _enhanced_truncated(src: Path, name: str) -> str:
    """An Enhanced CT object (all frames in one file) whose PixelData stops half-way."""
    path = write_enhanced(src / name / "enhanced.dcm", SMALL, patient_id=f"PID-{name}")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)
    return str(ds.SeriesInstanceUID)


NAN = float("nan")
# case -> (reason code, writer(src, name) -> series key)
CASES: dict[str, tuple[str, Callable[[Path, str], str]]] = {
    "nan_position": ("invalid_header", lambda s, n: _dicom(s, n, _on_slice(3, _set(
        ImagePositionPatient=[NAN, 0.0, 10.0])))),
    "zero_orientation": ("invalid_header", lambda s, n: _dicom(s, n, lambda ds, k: _set(
        ImageOrientationPatient=[0.0] * 6)(ds))),
    "parallel_orientation": ("invalid_header", lambda s, n: _dicom(s, n, lambda ds, k: _set(
        ImageOrientationPatient=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0])(ds))),
    "zero_spacing": ("invalid_header", lambda s, n: _dicom(s, n, lambda ds, k: _set(PixelSpacing=[0.0, 0.0])(ds))),
    "nan_rescale": ("invalid_header", lambda s, n: _dicom(s, n, _on_slice(2, _set(RescaleSlope=NAN)))),
    "huge_matrix": ("pixel_data_mismatch", lambda s, n: _dicom(s, n, lambda ds, k: _set(Rows=65535,
                                                                                      Columns=65535)(ds))),
    "truncated_slice": ("pixel_data_mismatch", lambda s, n: _dicom(s, n, _on_slice(4, lambda ds: setattr(
        ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 3])))),
    "enhanced_truncated": ("pixel_data_mismatch", _enhanced_truncated),
    "huge_compressed": ("too_large", _huge_compressed),
    "no_pixel_data": ("no_pixel_data", lambda s, n: _dicom(s, n, _on_slice(6, _drop_pixels))),
    # deflated: the header read cannot tell, so it is found when the pixels are read
    "no_pixel_data_deflated": ("no_pixel_data", lambda s, n: _dicom(s, n, _on_slice(6, _drop_pixels), SeriesSpec(
        **{**SMALL.__dict__, "transfer_syntax": "deflate"}))),
    "nifti_nan": ("not_finite", lambda s, n: _nifti(s, n, _nifti_with(NAN))),
    "nifti_inf": ("not_finite", lambda s, n: _nifti(s, n, _nifti_with(float("inf")))),
    "nifti_corrupt_gzip": ("unreadable", lambda s, n: _nifti(s, n, _corrupt_gzip)),
}
GOOD = ("good_dicom", "good_nifti")


def write_corpus(src: Path, cases: tuple[str, ...] = tuple(CASES)) -> dict[str, str]:
    """The two valid series and the chosen cases under `src`; {name: series key}."""
    keys = {"good_dicom": _dicom(src, "good_dicom", lambda ds, k: None),
            # other pixels than good_dicom's (the same ones would be a duplicate of it)
            "good_nifti": _nifti(src, "good_nifti", lambda path: nib.save(nifti_of(OTHER), path))}
    for name in cases:
        keys[name] = CASES[name][1](src, folder(name))
    return keys


def folder(case: str) -> str:
    """The case's file or folder name under SRC (never a reason code: tests look for it in the outputs)."""
    return f"case-{case}"
