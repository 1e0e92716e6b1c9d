"""The input-format seam: a format the library has never heard of (tests/toy_format.py, one module) is registered
through the public registry and goes through the real `headct ingest` job, in spawned workers, into the store:
discovery, QC, series selection, resampling, deduplication keys, manifest, rejects and linkage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, head_phantom, slice_positions, voxel_lps, write_series  # noqa: E402
from ingest_helpers import EXPECTED_MARKER_RAS, TEST_KEY, hu_at, make_cfg, marker_ras, run_ingest  # noqa: E402
from toy_format import ToyFormat, write_toy  # noqa: E402

from headct.config import JobContext  # noqa: E402
from headct.data import formats, store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


@pytest.fixture
def toy():
    formats.register(ToyFormat())
    yield
    formats.unregister("toy")
    assert "toy" not in {f.name for f in formats.registered()}


def _toy_of(spec: SeriesSpec, json_path: Path, **ids) -> None:
    """The head phantom on `spec`'s (axial) grid, as a toy volume with the same geometry as write_series gives."""
    positions = slice_positions(spec)
    hu = np.stack([np.rint(head_phantom(voxel_lps(spec, p))) for p in positions])
    write_toy(json_path, hu, origin_lps=tuple(positions[0]), spacing_mm=(spec.slice_step, *spec.pixel_spacing),
              **ids)


def test_a_registered_toy_format_goes_through_the_real_ingest_job(tmp_path: Path, toy, sqlite_tracking) -> None:
    from pipelines.ingest import run

    cfg = make_cfg(tmp_path, workers=2)  # spawned workers: the registration must reach them
    spec = SeriesSpec()
    _toy_of(spec, cfg.src / "toys" / "soft.json", study="TOY-STUDY-1", series="TOY-SOFT", patient="TOY-PAT-0001")
    _toy_of(spec, cfg.src / "toys" / "bone.json", study="TOY-STUDY-1", series="TOY-BONE", patient="TOY-PAT-0001",
            kernel="H70h")
    _toy_of(SeriesSpec(n_slices=4), cfg.src / "short" / "x", study="TOY-STUDY-2", series="TOY-SHORT",
            patient="TOY-PAT-0002")  # recognised by content, not by name
    write_series(cfg.src / "dicom", SeriesSpec(centre=(0.0, 0.0, 2.5)), patient_id="PID-DCM-00001")
    (cfg.src / "notes.txt").write_text("not a volume")

    summary = run(cfg, JobContext(root=tmp_path, tracking=sqlite_tracking))

    assert (summary["files_toy"], summary["files_dicom"], summary["files_nifti"]) == (3, 32, 0)
    assert summary["files_other"] == 4 and summary["files_unreadable"] == 0  # three .npy and the notes
    assert summary["accepted"] == 2 and summary["rejected"] == {"not_selected": 1, "too_few_slices": 1}
    pseudo = Pseudonymizer(TEST_KEY.encode())
    manifest = store.read_manifest(cfg.dest).set_index("scan_id")
    row = manifest.loc[pseudo.series("TOY-SOFT")]
    assert (row["source_format"], row["patient_key_source"], row["kernel"]) == ("toy", "dataset", "H30s")
    assert row["patient_id"] == pseudo.patient("TOY-PAT-0001") and row["study_id"] == pseudo.study("TOY-STUDY-1")
    assert (row["src_shape"], row["src_spacing_mm"], row["n_slices"]) == ("[64, 72, 32]", "[3.0, 3.0, 5.0]", 32)
    assert row["instances_id"] == "" and len(row["content_sha256"]) == 64
    assert set(manifest["source_format"]) == {"toy", "dicom"}
    rejects = pd.read_csv(cfg.dest / store.REJECTS).set_index("series_id")
    assert rejects.loc[pseudo.series("TOY-BONE"), "reason"] == "not_selected"
    assert "soft-tissue kernel" in rejects.loc[pseudo.series("TOY-BONE"), "message"]
    assert rejects.loc[pseudo.series("TOY-SHORT"), "reason"] == "too_few_slices"
    vol = store.read_volume(cfg.dest, row["volume"])
    affine = store.affine_of(row)
    assert vol.shape == (32, 32, 32) and vol.dtype == np.int16
    assert np.linalg.norm(marker_ras(vol, affine) - EXPECTED_MARKER_RAS) < 3.0  # the marker where RAS+ puts it
    assert abs(hu_at(vol, affine, (0.0, 0.0, 0.0)) - 35) <= 2  # brain at the world origin
    assert (cfg.report_dir / "metrics.json").is_file()
    linkage = pd.read_csv(tmp_path / "private" / "link.csv").set_index("scan_id")
    assert linkage.loc[pseudo.series("TOY-SOFT"), "series_uid"] == "TOY-SOFT"

    # the same pixels and geometry written as DICOM give the very same canonical volume and content hash
    dicom = make_cfg(tmp_path / "as_dicom")
    write_series(dicom.src / "s", spec)
    run_ingest(dicom)
    twin = store.read_manifest(dicom.dest).iloc[0]
    np.testing.assert_array_equal(store.read_volume(dicom.dest, twin["volume"]), vol)
    assert twin["content_sha256"] == row["content_sha256"] and twin["affine"] == row["affine"]


def test_registry_refuses_a_second_format_of_one_name_and_forgets_an_unregistered_one(toy) -> None:
    with pytest.raises(ValueError, match="already registered"):
        formats.register(ToyFormat())
    with pytest.raises(TypeError, match="InputFormat"):
        formats.register(object())  # type: ignore[arg-type]
    formats.unregister("toy")
    with pytest.raises(KeyError, match="no input format 'toy'"):
        formats.get("toy")
