"""Geometry and HU through the whole ingest, one known distortion at a time, and every input route (single-frame,
Enhanced CT multi-frame, compressed transfer syntaxes, NIfTI) giving the same canonical volume.

Every series is written from one world phantom (tests/dicom_factory.py): brain at 35 HU and a 2000 HU marker on
the patient's Left, Anterior, Superior side. Whatever the geometry, the ingested volume must show brain HU at the
world origin and the marker where RAS+ puts it.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, nifti_of, slice_positions, write_enhanced, write_series  # noqa: E402
from ingest_helpers import EXPECTED_MARKER_RAS, TEST_KEY, hu_at, make_cfg, marker_ras, only_volume, run_ingest  # noqa: E402

from headct.data import store  # noqa: E402
from headct.data.discovery import group_series, read_headers  # noqa: E402
from headct.data.formats.dicom import load_hu  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV  # noqa: E402
from headct.data.series import stack_geometry  # noqa: E402


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def _tilted(degrees: float) -> dict:
    """Gantry tilt: axial slices whose positions advance along z and, in proportion, along y."""
    positions = slice_positions(SeriesSpec())
    positions[:, 1] += (positions[:, 2] - positions[0, 2]) * np.tan(np.radians(degrees))
    return {"positions": [tuple(p) for p in positions]}


def _uneven() -> dict:
    """4 mm steps in the lower half of the stack, 6 mm in the upper half."""
    positions = slice_positions(SeriesSpec())
    steps = np.where(np.arange(len(positions) - 1) < len(positions) // 2, 4.0, 6.0)
    positions[:, 2] = positions[0, 2] + np.concatenate([[0.0], np.cumsum(steps)])
    return {"positions": [tuple(p) for p in positions]}


def _oblique(degrees: float) -> dict:
    """Slices rotated about the patient's left-right axis (the slice normal leans toward anterior)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"orientation": (1.0, 0.0, 0.0, 0.0, c, -s)}


VARIANTS = {
    "reference": {},
    "reversed_and_shuffled": {"reverse_instances": True, "shuffle_names": True, "extension": ""},
    "oblique_20deg": _oblique(20.0),
    "gantry_tilt_15deg": _tilted(15.0),
    "uneven_spacing": _uneven(),
    "unsigned_intercept_minus_1024": {"unsigned": True, "intercept": -1024.0},
    "signed_slope_2": {"unsigned": False, "slope": 2.0, "intercept": -1000.0},
    "pixel_padding": {"unsigned": False, "fov_radius_mm": 80.0, "padding_value": -2000},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_brain_hu_and_marker_position_survive_every_geometry(tmp_path: Path, variant: str) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SeriesSpec(**VARIANTS[variant]))
    run_ingest(cfg)
    vol, affine, row = only_volume(cfg)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert abs(hu_at(vol, affine, (0.0, 0.0, 0.0)) - 35) <= 2  # brain at the world origin
    assert abs(hu_at(vol, affine, (-20.0, 10.0, -20.0)) - 35) <= 2
    # 5 mm slices sample the 12 mm marker block coarsely (the uneven stack's upper half: 6 mm slices at 34.5 and
    # 40.5 mm put its centroid at ~37.5 mm instead of 35): the tolerance is the sampling, not the geometry
    tolerance = 4.0 if variant == "uneven_spacing" else 3.0
    assert np.abs(marker_ras(vol, affine) - EXPECTED_MARKER_RAS).max() <= tolerance
    if variant == "gantry_tilt_15deg":
        assert abs(row["tilt_deg"] - 15.0) < 0.1
    assert vol.min() >= -1024


def test_pixel_padding_is_air_not_its_stored_value(tmp_path: Path) -> None:
    """Outside the reconstruction circle (stored -2000 = -3024 HU) must resample exactly like air (-1024 HU):
    unmasked, the border of the circle would blend -3024 HU into the skull and brain."""
    padded, air = make_cfg(tmp_path / "padded"), make_cfg(tmp_path / "air")
    spec = {"unsigned": False, "fov_radius_mm": 80.0}
    write_series(padded.src / "s", SeriesSpec(**spec, padding_value=-2000))
    write_series(air.src / "s", SeriesSpec(**spec, padding_value=0))  # stored 0 = -1024 HU with intercept -1024
    run_ingest(padded)
    run_ingest(air)
    assert np.array_equal(only_volume(padded)[0], only_volume(air)[0])


def test_oblique_within_the_angle_is_accepted_beyond_it_rejected(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, qc=make_cfg(tmp_path).qc.model_copy(update={"max_oblique_deg": 25.0}))
    write_series(cfg.src / "a", SeriesSpec(**_oblique(20.0)), patient_id="PID-OBL-00001")
    write_series(cfg.src / "b", SeriesSpec(**_oblique(30.0)), patient_id="PID-OBL-00002")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 1 and summary["rejected"] == {"non_axial": 1}


@pytest.mark.parametrize("syntax", ["rle", "j2k", "deflate"])
def test_compressed_series_give_the_uncompressed_volume(tmp_path: Path, syntax: str) -> None:
    plain, packed = make_cfg(tmp_path / "plain"), make_cfg(tmp_path / "packed")
    write_series(plain.src / "s", SeriesSpec(n_slices=12))
    paths = write_series(packed.src / "s", SeriesSpec(n_slices=12, transfer_syntax=syntax))
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID.is_compressed == (syntax != "deflate")
    run_ingest(plain)
    run_ingest(packed)
    assert np.array_equal(only_volume(plain)[0], only_volume(packed)[0])


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_expb.dcm"]
)
def test_pydicoms_bundled_compressed_files_decode_like_the_uncompressed_one(tmp_path: Path, name: str) -> None:
    """pydicom's own test files (offline): the same MR slice stored with RLE, JPEG 2000, JPEG-LS and big endian."""

    def stored(path: Path) -> np.ndarray:
        found = read_headers([path])
        assert not found.bad_files
        series = group_series(found.headers)[0]
        header = series.slices[0]
        series = type(series)(series.study_uid, series.series_uid, (dataclasses.replace(
            header, rescale=(1.0, 0.0)),))  # an MR slice has no rescale; HU here = stored
        geometry = stack_geometry(series)
        return load_hu(series, geometry)[0]

    reference = stored(Path(get_testdata_file("MR_small.dcm")))
    assert np.array_equal(stored(Path(get_testdata_file(name))), reference)


def test_real_jpeg2000_head_ct_slice_decodes_to_plausible_hu() -> None:
    """J2K_pixelrep_mismatch.dcm: a real (gantry-tilted) head CT slice, JPEG 2000, whose codestream's signedness
    disagrees with PixelRepresentation; pydicom's plugin corrects it, so air and bone come out as HU."""
    path = Path(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    series = group_series(read_headers([path]).headers)[0]
    hu = load_hu(series, stack_geometry(series))[0]
    assert np.percentile(hu, 5) < -900 and np.percentile(hu, 99.9) > 700


def test_enhanced_ct_multiframe_gives_the_single_frame_volume(tmp_path: Path) -> None:
    single, multi = make_cfg(tmp_path / "single"), make_cfg(tmp_path / "multi")
    spec = SeriesSpec(**_tilted(10.0))  # 32 slices
    write_series(single.src / "s", spec)
    write_enhanced(multi.src / "s" / "enhanced.dcm", spec)  # frames in shuffled order, geometry per frame
    run_ingest(single)
    summary = run_ingest(multi)
    assert summary["files_dicom"] == 1 and summary["accepted"] == 1
    a, affine_a, _ = only_volume(single)
    b, affine_b, row = only_volume(multi)
    assert np.array_equal(a, b) and np.allclose(affine_a, affine_b)
    assert row["n_slices"] == 32 and row["kernel"] == "H30s" and row["kvp"] == 120.0


def test_compressed_multiframe_ingests(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_enhanced(cfg.src / "e.dcm", SeriesSpec(n_slices=12, transfer_syntax="rle"))
    run_ingest(cfg)
    vol, affine, _ = only_volume(cfg)
    assert abs(hu_at(vol, affine, (0.0, 0.0, 0.0)) - 35) <= 2


# ------------------------------------------------------------------------------------------------------ NIfTI
@pytest.mark.parametrize("orientation", ["as_written", "LPI"])
def test_nifti_route_equals_the_dicom_route(tmp_path: Path, orientation: str) -> None:
    """The same volume as a DICOM series and as NIfTI (stored values + scl_slope/scl_inter, any axis order)."""
    dicom, nifti = make_cfg(tmp_path / "dicom"), make_cfg(tmp_path / "nifti")
    spec = SeriesSpec(**_oblique(10.0))
    write_series(dicom.src / "s", spec)
    image = nifti_of(spec)
    if orientation == "LPI":  # stored left-to-right flipped, posterior-to-anterior, inferior-to-superior
        image = image.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "P", "I"))))
        image.header.set_slope_inter(spec.slope, spec.intercept)  # nibabel resets scaling on a new image
        assert nib.aff2axcodes(image.affine) == ("L", "P", "I")
    (nifti.src / "patient 7").mkdir(parents=True)
    nib.save(image, nifti.src / "patient 7" / "head.nii.gz")
    run_ingest(dicom)
    summary = run_ingest(nifti)
    assert summary["files_nifti"] == 1
    a, affine_a, _ = only_volume(dicom)
    b, affine_b, row = only_volume(nifti)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert row["source_format"] == "nifti" and row["patient_key_source"] == "self"


def test_nifti_and_dicom_of_one_volume_in_one_source_are_stored_once(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "dicom", SeriesSpec())
    (cfg.src / "nifti").mkdir(parents=True)
    nib.save(nifti_of(SeriesSpec()), cfg.src / "nifti" / "same.nii")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 1 and summary["rejected"] == {"duplicate": 1}


def test_nifti_not_3d_and_not_hu_are_rejected_with_reasons(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.src.mkdir(parents=True)
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12, 3), np.int16), affine), cfg.src / "four_d.nii.gz")
    mr_like = np.random.default_rng(0).uniform(0, 1200, (32, 32, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(mr_like, affine), cfg.src / "mr_like.nii.gz")
    nib.save(nifti_of(SeriesSpec()), cfg.src / "good.nii.gz")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 1
    assert summary["rejected"] == {"not_3d": 1, "not_hu": 1}
    messages = " ".join(__import__("pandas").read_csv(cfg.dest / store.REJECTS)["message"])
    assert "3D" in messages and "HU" in messages and str(tmp_path) not in messages


def test_dicomdir_is_an_index_not_an_image_or_a_broken_file(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SeriesSpec(n_slices=8))
    bundled = Path(get_testdata_file("DICOMDIR", read=False) or "")
    if not bundled.is_file():  # pydicom keeps it under dicomdirtests/
        bundled = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "DICOMDIR"
    shutil.copy(bundled, cfg.src / "DICOMDIR")
    summary = run_ingest(cfg)
    assert (summary["files_dicomdir"], summary["files_unreadable"], summary["accepted"]) == (1, 0, 1)


@pytest.mark.parametrize("centre", [(0.0, 0.0, 0.0), (1.5, 1.5, 0.0), (0.7, -2.2, 0.0)])
def test_the_grid_does_not_depend_on_the_storage_direction(tmp_path: Path, centre: tuple) -> None:
    """The same pixels stored left-to-right or right-to-left (rows too) must give the same head box, grid and
    volume; with the field of view centred on half a pixel (1.5 mm at 3 mm pixels) a subsample anchored at the
    array's first pixel would shift the grid by one pixel between the two."""
    forward, backward = make_cfg(tmp_path / "forward"), make_cfg(tmp_path / "backward")
    write_series(forward.src / "s", SeriesSpec(centre=centre, pixel_spacing=(1.0, 1.0), rows=200, cols=180))
    write_series(backward.src / "s", SeriesSpec(centre=centre, pixel_spacing=(1.0, 1.0), rows=200, cols=180,
                                                orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)))
    run_ingest(forward)
    run_ingest(backward)
    a, affine_a, _ = only_volume(forward)
    b, affine_b, _ = only_volume(backward)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
