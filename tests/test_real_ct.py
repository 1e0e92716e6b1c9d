"""A real adult head CT (Debian's invesalius-examples, fetched at test time; tests/real_ct.py) through `headct ingest`.

The volume is written as a DICOM CT series (unsigned storage, intercept -1024, standard axial orientation, instance
numbers running superior -> inferior) and as a NIfTI file (LAS array order) in the same patient position; both are
ingested with the command line at the default grid (96^3 at 2 mm). Checks, measured on the canonical RAS+ volume:
- orientation: the air inside the head (paranasal sinuses, nasal cavity) and the densest voxels (tooth enamel) lie
  anterior (+y) of the head's centre; the head's cross-section shrinks towards the vertex (+z);
- brain HU: the mode of soft-tissue HU inside the head is 15-45 HU (grey/white matter);
- the NIfTI route gives the DICOM route's volume: the same grid up to one head-localisation step (<= 2 mm), and each
  route's volume is the source sampled on its own grid (trilinear, done outside headct): mean |difference| inside
  the head under 1 HU; and both routes give one grid and, voxel by voxel, one volume;
- SimpleITK's series reader and linear resampler, onto exactly the grid headct recorded, agree with headct's volume
  inside the head: mean |difference| under 2 HU;
- no patient tag, UID or source folder name reaches any output but the local linkage file.
Left/right cannot be checked on this symmetric anatomy (the synthetic marker tests in test_ingest.py do that).
When the package cannot be fetched (no apt, no network) the whole module skips with the reason, except in CI
(environment variable CI set, as `.ci/run` does), where every test here fails with it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_ct  # noqa: E402

HEAD_HU = -300.0  # skin and everything inside it lie above; air and foam below


@dataclass(frozen=True)
class Ingested:
    volume: np.ndarray  # int16 (x, y, z) RAS+
    affine: np.ndarray  # 4x4 voxel -> RAS mm, as the manifest records it
    output: str
    project: Path  # where `headct ingest` ran: DEST is project/store, the linkage file under project/private


@pytest.fixture(scope="module")
def ct() -> real_ct.RealCT:
    return real_ct.for_tests()  # skips with the reason outside CI; in CI a CT that cannot be had is a failure


@pytest.fixture(scope="module")
def sources(ct: real_ct.RealCT, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("real_ct_src")
    series = base / "dicom" / "export 0001" / "HEAD 1.5"
    real_ct.write_dicom_series(ct, series)
    nifti = real_ct.write_nifti(ct, base / "nifti" / "cranium.nii.gz")
    return {"dicom": base / "dicom", "series": series, "nifti": nifti.parent}


def headct_ingest(src: Path, project: Path, tracking_uri: str) -> tuple[int, str, Path]:
    """`headct ingest SRC DEST` through the Typer app, standing in `project`; returns (exit code, output, DEST)."""
    from typer.testing import CliRunner

    import cli

    project.mkdir(parents=True, exist_ok=True)
    # An empty params.yaml makes `project` the project root, so the built-in defaults apply and every output
    # lands here, wherever the temp folder lies (a params.yaml in a folder above it would otherwise be found).
    (project / "params.yaml").write_text("{}\n")
    dest = project / "store"
    args = ["ingest", str(src), str(dest), "--set", "ingest.workers=1",
            "--set", f"tracking.uri={tracking_uri}", "--set", "tracking.experiment=real-ct"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("HEADCT_PSEUDONYM_KEY", "headct-tests-only-pseudonym-key-real-ct")  # real data needs a key
        mp.delenv("HEADCT_PSEUDONYM_KEY_FILE", raising=False)
        result = CliRunner().invoke(cli.app, args)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        output += "".join(traceback.format_exception(result.exception))
    return result.exit_code, output, dest


def only_volume(dest: Path, output: str) -> Ingested:
    from headct.data import store

    manifest = store.read_manifest(dest)
    assert len(manifest) == 1, f"expected one accepted series, got {len(manifest)}:\n{output[-3000:]}"
    row = manifest.iloc[0]
    return Ingested(store.read_volume(dest, row["volume"]), store.affine_of(row), output, dest.parent)


@pytest.fixture(scope="module")
def dicom_route(sources: dict[str, Path], mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    code, output, dest = headct_ingest(sources["dicom"], tmp_path_factory.mktemp("real_ct_dicom"), mlflow_store)
    assert code == 0, output[-3000:]
    return only_volume(dest, output)


@pytest.fixture(scope="module")
def nifti_route(sources: dict[str, Path], mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    code, output, dest = headct_ingest(sources["nifti"], tmp_path_factory.mktemp("real_ct_nifti"), mlflow_store)
    assert code == 0, output[-3000:]
    return only_volume(dest, output)


# ------------------------------------------------------------------------------------------------- measures
def head_mask(vol: np.ndarray) -> np.ndarray:
    """The head: the largest connected component above -300 HU after a small opening (drops the head holder)."""
    mask = ndimage.binary_opening(vol > HEAD_HU, np.ones((3, 3, 3), bool))
    labels, count = ndimage.label(mask)
    assert count > 0, "no head in the volume"
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def filled_axially(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.array([axis.mean() for axis in np.nonzero(mask)])
    return affine[:3, :3] @ index + affine[:3, 3]


def brain_mode_hu(vol: np.ndarray) -> int:
    """Mode of soft-tissue HU (-50..120) well inside the head (filled head eroded by 10 mm at 2 mm voxels)."""
    inside = ndimage.binary_erosion(filled_axially(head_mask(vol)), iterations=5)
    values = vol[inside & (vol > -50) & (vol < 120)].astype(int)
    counts = np.bincount(values + 50, minlength=170)
    smooth = np.convolve(counts, np.ones(5) / 5, mode="same")  # 5-HU boxcar: noise and rounding
    return int(smooth.argmax()) - 50


# -------------------------------------------------------------------------------------------------- checks
def test_face_is_anterior_and_vertex_superior_in_ras(dicom_route: Ingested) -> None:
    vol, affine = dicom_route.volume.astype(np.float32), dicom_route.affine
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    head = head_mask(vol)
    centre = centroid_mm(head, affine)

    # Face: the air enclosed by the head (paranasal sinuses, nasal cavity, some mastoid) sits in front of the
    # head's centre, and so does the densest material (tooth enamel, > 2000 HU).
    enclosed_air = filled_axially(head) & ~head & (vol < HEAD_HU)
    assert enclosed_air.sum() > 500, "no sinus/nasal air found inside the head"
    air_ahead = centroid_mm(enclosed_air, affine)[1] - centre[1]
    densest = vol >= np.sort(vol.ravel())[-50]
    teeth_ahead = centroid_mm(densest, affine)[1] - centre[1]
    assert air_ahead > 20.0, f"enclosed air is {air_ahead:.1f} mm anterior of the head centre (face not at +y)"
    assert teeth_ahead > 20.0, f"densest voxels {teeth_ahead:.1f} mm anterior of the head centre (face not at +y)"

    # Vertex: the head's axial cross-section shrinks towards +z (the scan stops at the face below).
    area = head.sum(axis=(0, 1)).astype(float)
    zs = np.nonzero(area)[0]
    band = max(2, len(zs) // 10)
    bottom, top = area[zs[:band]].mean(), area[zs[-band:]].mean()
    assert top < 0.5 * bottom, f"head area top/bottom = {top / bottom:.2f}: vertex not at +z"
    assert area[zs[-band:]].argmax() == 0, "head area does not shrink toward the vertex"


def test_brain_mode_is_grey_white_matter(dicom_route: Ingested) -> None:
    mode = brain_mode_hu(dicom_route.volume)
    assert 15 <= mode <= 45, f"brain HU mode {mode} outside 15-45"


def test_nifti_route_gives_the_dicom_route_volume(
    ct: real_ct.RealCT, dicom_route: Ingested, nifti_route: Ingested
) -> None:
    nifti = nifti_route
    assert nib.aff2axcodes(nifti.affine) == ("R", "A", "S")
    # Same orientation and spacing. The grid's origin follows the head box, which is found on a ~2 mm subsample of
    # the array as stored, so it may move by a source pixel between array orders (measured: 0.96 mm in x between
    # these two files): at most one localisation step.
    np.testing.assert_allclose(nifti.affine[:3, :3], dicom_route.affine[:3, :3], atol=1e-6)
    shift = np.abs(nifti.affine[:3, 3] - dicom_route.affine[:3, 3])
    assert shift.max() <= 2.0, f"grid origins differ by {shift} mm"
    # The same volume: each route equals the source, sampled trilinearly outside headct, on the grid it recorded
    # (and so the two are one function of patient space).
    for name, route in (("DICOM", dicom_route), ("NIfTI", nifti)):
        reference = sample_source(ct, route.affine, route.volume.shape)
        inside = head_mask(route.volume.astype(np.float32))
        diff = np.abs(route.volume.astype(np.float32) - reference)[inside]
        assert diff.mean() < 1.0, f"{name} route: mean |volume - source on its grid| = {diff.mean():.3f} HU"


def test_dicom_and_nifti_routes_give_one_grid_and_one_volume(dicom_route: Ingested, nifti_route: Ingested) -> None:
    nifti = nifti_route
    np.testing.assert_allclose(nifti.affine, dicom_route.affine, atol=1e-3)
    inside = head_mask(dicom_route.volume.astype(np.float32))
    diff = np.abs(nifti.volume.astype(np.float32) - dicom_route.volume.astype(np.float32))[inside]
    assert diff.mean() < 1.0, f"mean |NIfTI - DICOM| inside the head = {diff.mean():.3f} HU"


def sample_source(ct: real_ct.RealCT, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The .inv3 volume sampled trilinearly (scipy, outside headct) at the centres of the grid `affine` describes,
    air (-1024) outside it; the same HU clip and rounding as the store."""
    to_source = np.linalg.inv(real_ct.affine_ras(ct)) @ affine  # grid (x, y, z) -> .inv3 voxel (x, y, z)
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = to_source[:3, :3] @ index + to_source[:3, 3:]
    values = ndimage.map_coordinates(ct.hu.astype(np.float32), xyz[::-1], order=1, mode="constant", cval=-1024.0)
    return np.rint(np.clip(values, -1024, 3071)).reshape(shape)


def test_simpleitk_reader_and_resampler_agree_inside_the_head(
    sources: dict[str, Path], dicom_route: Ingested
) -> None:
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(sources["series"])))  # sorted by position
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies RescaleSlope/Intercept
    image = reader.Execute()

    # headct's grid in ITK terms: ITK world is LPS, headct's RAS, so x and y flip.
    affine = dicom_route.affine
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    grid = sitk.Image([int(n) for n in dicom_route.volume.shape], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection((lps / spacing).ravel().tolist())  # row-major, column i = direction of axis i
    grid.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    itk = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)

    ours = dicom_route.volume.astype(np.float32)
    inside = ndimage.binary_erosion(ours > HEAD_HU, iterations=2)
    assert inside.sum() > 100_000, "head mask unexpectedly small"
    diff = np.abs(np.clip(itk, -1024, 3071) - ours)[inside]
    assert diff.mean() < 2.0, f"mean |SimpleITK - headct| inside the head = {diff.mean():.3f} HU"


def test_no_identifying_value_leaves_the_linkage_file(sources: dict[str, Path], dicom_route: Ingested) -> None:
    """Patient tags, UIDs and the source folder name appear in no output (store, reports, MLflow artifacts) but
    the local linkage file."""
    import pandas as pd
    import pydicom

    first = pydicom.dcmread(next(sources["series"].iterdir()), stop_before_pixels=True)
    secrets = [v for v in real_ct.FAKE_PATIENT.values() if len(v) >= 8]  # not the one-letter sex code
    secrets += [first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, "export 0001"]
    checked = 0
    for path in dicom_route.project.rglob("*"):
        if not path.is_file() or "private" in path.relative_to(dicom_route.project).parts:
            continue
        text = (pd.read_parquet(path).to_csv() if path.suffix == ".parquet"
                else path.read_bytes().decode("latin-1"))
        leaked = [value for value in secrets if value in text]
        assert not leaked, f"{path.relative_to(dicom_route.project)} holds {leaked}"
        checked += 1
    assert checked >= 6, "expected the store (volume, manifest, rejects, labels, preprocess), reports, MLflow files"


@pytest.mark.parametrize("ci", [None, "1"])
def test_an_unavailable_ct_skips_outside_ci_and_fails_in_ci(tmp_path: Path, ci: str | None) -> None:
    """A test session that cannot fetch the CT (no apt-get on PATH, an empty cache): outside CI the real-CT tests
    skip with the reason; with CI set they fail with it, so CI cannot pass without the real-anatomy checks."""
    import os
    import subprocess

    (tmp_path / "test_uses_ct.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import real_ct\n\n"
        "def test_needs_the_ct():\n"
        "    real_ct.for_tests()\n")
    env = {k: v for k, v in os.environ.items() if k != real_ct.CI_ENV}
    env.update({"PATH": str(tmp_path / "no-tools"), real_ct.CACHE_ENV: str(tmp_path / "cache"),
                **({real_ct.CI_ENV: ci} if ci else {})})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                           str(tmp_path / "test_uses_ct.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    reason = f"real head CT (Debian package {real_ct.PACKAGE}) unavailable: `apt-get` not found"
    out = " ".join(proc.stdout.split())
    if ci is None:
        assert proc.returncode == 0 and "1 skipped" in out and reason in out, out
    else:
        assert proc.returncode == 1 and "1 failed" in out and reason in out and "CI is set" in out, out
