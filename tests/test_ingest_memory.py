"""One series larger than the machine (issue 12): refused at QC as `too_large`, from its header, before any pixel
is decoded, not an out-of-memory kill of the whole run; and the memory a container allows is what counts."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from hostile_corpus import SMALL  # noqa: E402
from ingest_helpers import TEST_KEY, make_cfg  # noqa: E402

from headct.data import parallel, store  # noqa: E402
from headct.data.discovery import group_series, read_headers  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402
from headct.data.ingest import ingest  # noqa: E402
from headct.data.qc import QcResult  # noqa: E402

SIDE = 8192  # header_checks.MAX_MATRIX: every axis is allowed on its own; 8192^3 voxels are not


def _huge_nifti(path: Path) -> None:
    """A .nii.gz whose header describes an 8192^3 int16 volume in HU (decoded: ~3 TiB as float32 plus the stored
    array), a valid 1 mm RAS affine, and a few KiB of data after it: only the header is ever read."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((SIDE, SIDE, SIDE))
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_slope_inter(1.0, -1024.0)
    header["vox_offset"] = 352
    raw = io.BytesIO()
    header.write_to(raw)
    path.write_bytes(gzip.compress(raw.getvalue() + b"\0" * 4 + b"\0" * 65536))


def test_a_series_larger_than_the_machine_is_refused_up_front_and_the_run_goes_on(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "good", SMALL, patient_id="PID-GOOD")
    _huge_nifti(cfg.src / "huge.nii.gz")
    terminal = io.StringIO()
    summary = ingest(cfg, tmp_path, Console(file=terminal, width=300)).summary
    rejects = pd.read_csv(cfg.dest / store.REJECTS, keep_default_na=False)
    pseudo = Pseudonymizer(TEST_KEY.encode())
    (row,) = rejects[rejects["series_id"] == pseudo.series("nifti:huge")].itertuples()
    assert row.reason == "too_large" and "GiB" in row.message and "memory available" in row.message, row.message
    assert summary["accepted"] == 1 and summary["rejected"] == {"too_large": 1}
    assert len(store.read_manifest(cfg.dest)) == 1  # the other series is in the store
    said = terminal.getvalue()
    assert "series not used (too_large): huge.nii.gz" in said and str(cfg.src) not in said


def test_the_estimate_is_taken_from_a_dicom_header_and_compared_with_the_limit(tmp_path: Path) -> None:
    """An RLE series (no pixel length to compare) whose header says 8192 x 8192: 12 slices need ~3 GiB as float32."""
    write_series(tmp_path / "rle", SeriesSpec(**{**SMALL.__dict__, "transfer_syntax": "rle"}))
    import pydicom

    for path in (tmp_path / "rle").iterdir():
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = SIDE
        ds.save_as(path)
    (series,) = group_series(read_headers(sorted((tmp_path / "rle").iterdir()), tmp_path).headers)
    spec = make_cfg(tmp_path).preprocess
    need = parallel.series_bytes(series, spec)
    assert need >= 4 * SIDE * SIDE * 12  # the float32 stack at least
    ok = QcResult(None, "")
    refused = parallel.memory_check(series, ok, spec, limit=need - 1)
    assert refused.reason == "too_large" and f"~{need / 2**30:.1f} GiB by its header" in refused.message
    assert refused.path is None  # twelve files: the terminal names their folder
    assert parallel.memory_check(series, ok, spec, limit=need) is ok
    other = QcResult("kernel", "bone kernel")
    assert parallel.memory_check(series, other, spec, limit=0) is other  # the first failing check stays


@pytest.mark.parametrize(("limit", "usage", "stat", "room"), [
    ("4294967296", "3221225472", "inactive_file 1073741824\nactive_file 5\n", 2 * 2**30),  # cache is reclaimable
    ("4294967296", "5368709120", "inactive_file 0\n", 0),  # over its limit: no room at all
    ("max", "1024", "inactive_file 0\n", None),  # cgroup v2 without a limit
    ("9223372036854771712", "1024", "total_inactive_file 0\n", None),  # v1's "no limit"
])
def test_a_containers_memory_limit_bounds_what_is_available(tmp_path: Path, limit, usage, stat, room) -> None:
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text(usage + "\n")
    (tmp_path / "memory.stat").write_text(stat)
    files = ((str(tmp_path / "memory.max"), str(tmp_path / "memory.current"), "inactive_file"),)
    assert parallel.cgroup_room(files) == room
    assert parallel.cgroup_room(((str(tmp_path / "absent"), str(tmp_path / "absent2"), "x"),)) is None
    assert 0 < parallel.series_limit() <= parallel.available_memory()
