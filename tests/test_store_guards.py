"""A store stays consistent (issue 12): one writer at a time (shards of one job array side by side), one
preprocessing recipe, one source. Other writers are real processes holding the real locks."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from ingest_helpers import TEST_KEY, make_cfg, run_ingest  # noqa: E402

from headct.config import IngestConfig, PreprocessSpec  # noqa: E402
from headct.data import locks, store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV  # noqa: E402
from headct.data.ingest import ingest, merge  # noqa: E402
from headct.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from pathlib import Path
from headct.data import locks
shard = Path(sys.argv[2]) if len(sys.argv) > 2 else None
with locks.writing(Path(sys.argv[1]), "a test holder", shard):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def hold(*paths: Path) -> subprocess.Popen:
    """Another process holding the lock(s) of `paths` (DEST[, shard folder]) until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def two_series(cfg: IngestConfig) -> None:
    write_series(cfg.src / "a", SeriesSpec(n_slices=8), patient_id="PID-A-000001")
    write_series(cfg.src / "b", SeriesSpec(n_slices=9), patient_id="PID-B-000002")


def test_a_second_writer_is_refused_naming_the_lock_and_its_holder_and_a_killed_one_is_noted(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    two_series(cfg)
    holder = hold(cfg.dest)
    try:
        with pytest.raises(InputError, match=rf"ingest.lock is held by pid {holder.pid} on host .*a test holder"):
            run_ingest(cfg)
        assert not (cfg.dest / store.MANIFEST).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel frees the lock, its record stays
        holder.wait(timeout=60)
    assert "gone: that process no longer exists" in locks.describe_holder(cfg.dest / locks.LOCK)
    out = io.StringIO()
    assert ingest(cfg, cfg.src.parent, Console(file=out, width=300)).summary["accepted"] == 2
    assert f"pid {holder.pid}" in out.getvalue() and "ended without releasing" in out.getvalue()
    assert sorted(p.name for p in cfg.dest.glob("ingest.lock*")) == [locks.LOCK]  # the record went with the run


def test_shards_write_side_by_side_but_a_whole_run_a_merge_or_the_same_shard_twice_is_refused(
        tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    two_series(cfg)
    shard_one = cfg.dest / "shards" / "1of2"
    holder = hold(cfg.dest, shard_one)
    try:
        run_ingest(cfg.model_copy(update={"shard": "2/2"}))  # beside shard 1
        with pytest.raises(InputError, match=rf"ingest.lock is held by pid {holder.pid} .*a test holder"):
            run_ingest(cfg)
        with pytest.raises(InputError, match="ingest.lock is held by pid"):
            merge(cfg, [cfg.dest], cfg.src.parent)
        with pytest.raises(InputError, match=r"shards/1of2/shard.lock is held by pid"):
            run_ingest(cfg.model_copy(update={"shard": "1/2"}))
    finally:
        release(holder)
    run_ingest(cfg.model_copy(update={"shard": "1/2"}))
    assert merge(cfg, [cfg.dest], cfg.src.parent)["accepted"] == 2


def test_a_changed_recipe_is_refused_unless_rebuild(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    two_series(cfg)
    run_ingest(cfg)
    before = {p.name: p.read_bytes() for p in cfg.dest.rglob("*") if p.is_file()}
    coarser = cfg.model_copy(update={"preprocess": PreprocessSpec(shape=(24, 24, 24), spacing_mm=8.0)})
    with pytest.raises(InputError, match=r"another preprocessing recipe \(shape \[32, 32, 32\] at 6.0 mm.*\(shape "
                                         r"\[24, 24, 24\] at 8.0 mm.*new DEST.*ingest.rebuild=true"):
        run_ingest(coarser)
    assert {p.name: p.read_bytes() for p in cfg.dest.rglob("*") if p.is_file()} == before
    summary = run_ingest(coarser.model_copy(update={"rebuild": True}))
    assert summary["accepted"] == 2 and summary["converted"] == 2 and summary["orphan_volumes_removed"] == 0
    manifest = store.read_manifest(cfg.dest)
    assert set(manifest["preprocess_version"]) == {coarser.preprocess.version}
    assert all(store.read_volume(cfg.dest, v).shape == (24, 24, 24) for v in manifest["volume"])


def test_a_second_src_is_refused_and_never_removes_the_first_ones_volumes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    two_series(cfg)
    run_ingest(cfg)
    volumes = sorted(p.name for p in (cfg.dest / store.VOLUMES).iterdir())
    other = cfg.model_copy(update={"src": tmp_path / "other"})
    write_series(other.src / "c", SeriesSpec(n_slices=10), patient_id="PID-C-000003")
    with pytest.raises(InputError, match="ingested from another SRC.*new DEST.*ingest.rebuild=true"):
        run_ingest(other)
    assert sorted(p.name for p in (cfg.dest / store.VOLUMES).iterdir()) == volumes
    assert run_ingest(cfg)["reused"] == 2  # the same SRC again is welcome
    summary = run_ingest(other.model_copy(update={"rebuild": True}))
    assert summary["accepted"] == 1 and summary["orphan_volumes_removed"] == 2


def test_a_run_that_stops_before_writing_leaves_no_dest(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    (cfg.src / "notes").mkdir(parents=True)
    (cfg.src / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no readable DICOM or NIfTI file"):
        run_ingest(cfg)
    assert not cfg.dest.exists()
