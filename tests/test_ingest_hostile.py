"""Hostile inputs (issue 12): what a hospital export can hold never stops the run with a traceback.

One run ingests the hostile corpus (tests/hostile_corpus.py: real DICOM and NIfTI files, each broken one way,
beside two valid series); each case must give its reason code in rejects.csv while the valid series of the
same run are ingested, leave nothing half-written, and name the file at fault on the terminal by its path under
SRC only (never in a file headct writes). Then the header checks alone, the run's verdict (exit code), and
the ordinary faults of paths: names that are not UTF-8, a DEST that is a file or read-only, SRC == DEST, a DEST
inside SRC, a folder that cannot be read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, nifti_of, write_series  # noqa: E402
from hostile_corpus import CASES, GOOD, OTHER, SMALL, folder, write_corpus  # noqa: E402
from ingest_helpers import RULES, TEST_KEY, make_cfg, run_ingest  # noqa: E402
from toy_format import ToyFormat, write_toy  # noqa: E402

from headct.config import IngestConfig  # noqa: E402
from headct.data import store  # noqa: E402
from headct.data.guards import shown, verdict  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer, read_linkage  # noqa: E402
from headct.data.ingest import ingest  # noqa: E402
from headct.data.series import Series, SliceHeader  # noqa: E402
from headct.errors import InputError  # noqa: E402

TESTS = Path(__file__).resolve().parent
PSEUDO = Pseudonymizer(TEST_KEY.encode())


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def ingest_capturing(cfg: IngestConfig) -> tuple[dict, str]:
    """Run ingest; (summary, what it printed on the terminal)."""
    out = io.StringIO()
    summary = ingest(cfg, cfg.src.parent, Console(file=out, width=400)).summary
    return summary, out.getvalue()


def assert_nothing_half_written(dest: Path) -> None:
    """No temp file of an atomic write, no journal of an unfinished run, no volume the manifest does not name."""
    leftovers = [p.name for p in dest.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
    assert not (dest / store.JOURNAL).exists()
    named = {Path(v).name for v in store.read_manifest(dest)["volume"]}
    assert {p.name for p in (dest / "volumes").iterdir()} == named


# ------------------------------------------------------------------------------------------- hostile corpus
@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestConfig, dict[str, str], dict, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, TEST_KEY)
        mp.delenv(KEY_FILE_ENV, raising=False)
        cfg = make_cfg(tmp_path_factory.mktemp("hostile"))
        keys = write_corpus(cfg.src)
        summary, terminal = ingest_capturing(cfg)
    return cfg, keys, summary, terminal


@pytest.mark.parametrize("case", list(CASES))
def test_each_broken_series_is_one_reject_and_the_run_goes_on(hostile, case: str) -> None:
    cfg, keys, summary, terminal = hostile
    reason = CASES[case][0]
    rejects = pd.read_csv(cfg.dest / store.REJECTS, keep_default_na=False).set_index("series_id")
    assert rejects.loc[PSEUDO.series(keys[case]), "reason"] == reason
    # the other series of the same run: the valid ones accepted, every broken one rejected with its own code
    assert set(store.read_manifest(cfg.dest)["scan_id"]) == {PSEUDO.series(keys[g]) for g in GOOD}
    assert len(rejects) == len(CASES) and summary["series_broken"] == len(CASES)
    assert_nothing_half_written(cfg.dest)
    # the file at fault is named on the terminal, relative to SRC; nothing headct writes names it
    name = folder(case)
    assert any(line.startswith(f"series not used ({reason}): {name}") for line in terminal.splitlines()), terminal
    assert str(cfg.src) not in terminal
    written = "".join(p.read_text(errors="replace") for p in (cfg.dest / store.REJECTS, cfg.dest / store.LABELS))
    assert name not in written and str(cfg.src) not in written


def test_the_hostile_run_summary_counts_every_reason(hostile) -> None:
    _, _, summary, _ = hostile
    expected: dict[str, int] = {}
    for reason, _ in CASES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["rejected"] == dict(sorted(expected.items()))
    assert summary["accepted"] == len(GOOD) and summary["series_seen"] == len(GOOD) + len(CASES)
    assert verdict(summary, 0.5) is not None and "max_reject_fraction" in verdict(summary, 0.5)


def test_valid_files_read_exactly_as_before_the_checks(tmp_path: Path) -> None:
    """The header facts the checks use are read from the files: a valid series carries its true pixel bytes."""
    from headct.data.discovery import read_headers

    paths = write_series(tmp_path / "s", SMALL)
    headers = read_headers(paths, tmp_path).headers
    assert {(h.pixel_bytes, h.pixel_bytes_needed) for h in headers} == {(40 * 36 * 2, 40 * 36 * 2)}
    compressed = write_series(tmp_path / "rle", SeriesSpec(**{**SMALL.__dict__, "transfer_syntax": "rle"}))
    assert {h.pixel_bytes for h in read_headers(compressed, tmp_path).headers} == {None}  # encapsulated


# ------------------------------------------------------------------------------------------------ verdict
def _summary(accepted: int, seen: int, broken: int) -> dict:
    return {"accepted": accepted, "series_seen": seen, "series_broken": broken}


def test_verdict_counts_broken_series_only() -> None:
    assert verdict(_summary(1, 10, 5), 0.5) is None  # 50 %: not more than the limit
    assert "6 of 10" in verdict(_summary(1, 10, 6), 0.5)
    assert verdict(_summary(1, 10, 0), 0.0) is None  # localizers, dose reports, not_selected ... never count
    assert "no usable series" in verdict(_summary(0, 3, 0), 1.0)
    assert verdict(_summary(0, 0, 0), 0.5) is None  # a shard that holds no study


def _project(tmp_path: Path, mlflow_store: str, **ingest_keys) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    extra = "".join(f"  {k}: {v}\n" for k, v in ingest_keys.items())
    (project / "params.yaml").write_text(
        f"tracking:\n  uri: {mlflow_store}\n  experiment: hostile\ningest:\n  workers: 1\n"
        "  labels_format: none\n  patient_key: dicom\n" + extra +
        "  qc:\n    min_slices: 8\n    min_coverage_mm: 30\n  preprocess:\n    shape: [32, 32, 32]\n    spacing_mm: 6.0\n")
    return project


def test_the_job_exits_non_zero_past_max_reject_fraction(tmp_path: Path, mlflow_store: str, monkeypatch) -> None:
    from typer.testing import CliRunner

    import cli

    src = tmp_path / "src"
    write_corpus(src, ("nan_position", "no_pixel_data"))  # 2 broken of 4 series: 50 %
    project = _project(tmp_path, mlflow_store)
    monkeypatch.chdir(project)
    runner = CliRunner()
    ok = runner.invoke(cli.app, ["ingest", str(src), "store"])
    assert ok.exit_code == 0, ok.output
    strict = runner.invoke(cli.app, ["ingest", str(src), "store2", "--set", "ingest.max_reject_fraction=0.4"])
    assert strict.exit_code == 1
    assert "2 of 4 series were rejected as broken" in strict.output and "Traceback" not in strict.output
    # the store and the reports are written all the same: they say why
    assert len(store.read_manifest(project / "store2")) == 2
    assert json.loads((project / "reports" / "ingest" / "metrics.json").read_text())["series_broken"] == 2

    only_broken = tmp_path / "broken"
    write_corpus(only_broken, ("zero_spacing",))
    shutil.rmtree(only_broken / "good_dicom")
    (only_broken / "good_nifti.nii.gz").unlink()
    none = runner.invoke(cli.app, ["ingest", str(only_broken), "store3"])
    assert none.exit_code == 1 and "no usable series" in none.output


# ----------------------------------------------------------------------------------------- paths and names
def test_names_that_are_not_utf8_are_ingested_and_kept_as_bytes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    src = os.fsencode(cfg.src)
    folder = Path(os.fsdecode(src + b"/caf\xe9 \xff"))  # Latin-1 and a stray byte: not UTF-8
    write_series(folder / "series", SMALL, patient_id="PID-LATIN1")
    nib.save(nifti_of(OTHER), os.fsdecode(src + b"/sch\xe4del.nii.gz"))
    summary, terminal = ingest_capturing(cfg)
    assert summary["accepted"] == 2 and summary["rejected"] == {}
    assert shown(folder / "series", cfg.src) == "caf\\xe9 \\xff/series"  # how the terminal names it
    raw = cfg.linkage.read_bytes()
    assert b"caf\xe9 \xff/series" in raw  # the linkage file keeps the name as it is on disk
    linkage = read_linkage(cfg.linkage)
    assert os.fsdecode(os.fsencode(folder / "series")) in set(linkage["source_folder"])
    # the NIfTI's pseudonym hashes its raw name: the same on every run, and valid UTF-8 names are unaffected
    assert PSEUDO.series("nifti:sch\udce4del") in set(store.read_manifest(cfg.dest)["scan_id"])
    assert PSEUDO.series("nifti:plain") == Pseudonymizer(TEST_KEY.encode()).series("nifti:plain")


def test_a_dest_that_is_a_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SMALL)
    cfg.dest.write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_ingest(cfg)
    assert cfg.dest.read_text() == "not a folder" and not cfg.linkage.exists()


def test_src_equal_to_dest_is_refused(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SMALL)
    with pytest.raises(InputError, match="same folder"):
        run_ingest(cfg.model_copy(update={"dest": cfg.src / "s" / ".."}))
    assert sorted(p.name for p in cfg.src.iterdir()) == ["s"] and not cfg.linkage.exists()


def test_a_dest_inside_src_is_left_out_of_the_walk(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg = cfg.model_copy(update={"dest": cfg.src / "store", "export_nifti": True})
    write_series(cfg.src / "s", SMALL)
    first = run_ingest(cfg)
    assert (cfg.dest / "nifti").is_dir()  # NIfTI files a walk of SRC would take for new series
    second = run_ingest(cfg)
    assert first["series_seen"] == second["series_seen"] == 1 and second["files_nifti"] == 0
    assert second["reused"] == 1


# ------------------------------------------------------------------------- as a user without privileges
@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="headct-hostile-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def ingest_unprivileged(base: Path, dest: Path, modes: dict[Path, int]) -> tuple[int, str]:
    """Ingest base/src into `dest` in a forked child that permissions bind (as `nobody` when the tests run as
    root, who reads and writes everything; else as the current user), after giving `modes` to those paths.
    Returns (0 and the summary as JSON, or 1 and the InputError), then what the run printed.

    Forked, not a new interpreter: the interpreter may live where `nobody` cannot read. So every module the run
    needs is imported here first, by a run of the same code as root on a valid copy."""
    warm = make_cfg(base / "warm-up")
    write_series(warm.src / "s", SMALL)
    run_ingest(warm)
    for path in [base, *base.rglob("*")]:  # everything else readable and its folders enterable
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    (base / "private").mkdir(exist_ok=True)
    (base / "private").chmod(0o777)  # the linkage file's folder
    for path, mode in modes.items():
        path.chmod(mode)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code, text = 2, ""
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = io.StringIO()
            try:
                summary = ingest(make_cfg(base, dest=dest), base, Console(file=out, width=400)).summary
                code, text = 0, json.dumps(summary)
            except InputError as exc:
                code, text = 1, str(exc)
            text += "\n" + out.getvalue()
        except BaseException:
            import traceback

            text = traceback.format_exc()
        finally:
            os.write(write_end, text.encode("utf-8", "backslashreplace"))
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        output = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_an_unreadable_folder_is_counted_and_named(shared_tmp: Path) -> None:
    src = shared_tmp / "src"
    write_series(src / "readable", SMALL)
    write_series(src / "locked", SMALL, patient_id="PID-LOCKED")
    dest = shared_tmp / "store"
    dest.mkdir()
    code, output = ingest_unprivileged(shared_tmp, dest, {src / "locked": 0o000, dest: 0o777})
    assert code == 0, output[-3000:]
    summary = json.loads(output.splitlines()[0])
    assert summary["folders_unreadable"] == 1 and summary["accepted"] == 1
    assert "folder not read (Permission denied): locked" in output
    assert str(src) not in output


def test_a_read_only_dest_is_refused_before_anything_is_written(shared_tmp: Path) -> None:
    write_series(shared_tmp / "src" / "s", SMALL)
    dest = shared_tmp / "store"
    dest.mkdir()
    code, output = ingest_unprivileged(shared_tmp, dest, {dest: 0o555})
    assert code == 1, output[-3000:]
    assert output.startswith(f"ingest destination {dest} cannot be written (Permission denied)"), output
    assert list(dest.iterdir()) == [] and list((shared_tmp / "private").iterdir()) == []


def test_the_nan_case_is_valid_ct_but_for_its_one_voxel(tmp_path: Path) -> None:
    """The not_finite cases isolate the fault: the same file with that voxel finite is ingested."""
    from hostile_corpus import _nifti_with

    cfg = make_cfg(tmp_path)
    cfg.src.mkdir()
    _nifti_with(0.0)(cfg.src / "finite.nii.gz")
    assert run_ingest(cfg)["accepted"] == 1


# ---------------------------------------------------------------------------------------- header checks
CT = "1.2.840.10008.5.1.4.1.1.2"


def _headers(**change) -> Series:
    """Headers only: a 12-slice axial stack 5 mm apart; `change` sets fields on every slice (a callable: per k)."""
    from dataclasses import replace

    base = SliceHeader(path=Path("/x/0"), study_uid="1.2", series_uid="1.2.3", patient_id="p", modality="CT",
                       image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sop_class_uid=CT, rows=40, cols=36,
                       pixel_spacing=(4.0, 4.0), orientation=(1.0, 0, 0, 0, 1.0, 0), position=(0.0, 0.0, 0.0),
                       frames=1, slice_thickness=5.0, kernel="H30s", kvp=120.0, manufacturer="", body_part="",
                       series_description="HEAD", contrast_agent="", rescale=(1.0, -1024.0), pixel_bytes=2880,
                       pixel_bytes_needed=2880)
    slices = []
    for k in range(12):
        fields = {"path": Path(f"/x/{k}"), "position": (0.0, 0.0, 5.0 * k)}
        fields.update({key: value(k) if callable(value) else value for key, value in change.items()})
        slices.append(replace(base, **fields))
    return Series("1.2", "1.2.3", tuple(slices))


@pytest.mark.parametrize(("change", "reason"), [
    ({"position": lambda k: (0.0, float("inf"), 5.0 * k)}, "invalid_header"),
    ({"slice_thickness": float("nan")}, "invalid_header"),
    ({"orientation": (1.0, 0.0, 0.0, 0.2, 0.98, 0.0)}, "invalid_header"),  # 11.5 degrees off perpendicular
    ({"pixel_spacing": (4.0, -4.0)}, "invalid_header"),
    ({"rows": 0}, "invalid_header"),
    ({"pixel_bytes": lambda k: 0 if k == 7 else 2880}, "no_pixel_data"),
    ({"rows": 9000, "pixel_bytes": None}, "too_large"),
    ({"rows": 9000, "pixel_bytes_needed": 9000 * 36 * 2}, "pixel_data_mismatch"),
    ({"orientation": (1.0, 0.0, 0.0, 0.0005, 0.9999999, 0.0)}, None),  # decimal-string rounding: accepted
    ({"orientation": (2.0, 0.0, 0.0, 0.0, 2.0, 0.0)}, None),  # not unit length: normalised, as before
    ({"pixel_bytes": None, "pixel_bytes_needed": None}, None),  # compressed: nothing to compare
    ({"pixel_bytes": 4000}, None),  # more than needed (trailing padding byte, say): fine
])
def test_header_checks_run_before_any_arithmetic(change: dict, reason: str | None) -> None:
    from headct.data.selection import qc_series

    result = qc_series(_headers(**change), RULES)
    assert result.reason == reason, result.message
    if reason is not None:
        assert result.path is not None and "/x/" not in result.message  # the file: terminal only


# ---------------------------------------------------------------------------- the unforeseen exception
class BuggyFormat(ToyFormat):
    """The toy format with a bug in its QC for one series and in its pixel reader for another."""

    name = "buggy"

    def header_qc(self, series: Series, rules, criteria):
        if series.series_uid == "BUG-QC":
            raise KeyError(f"a bug, quoting {series.first.path}")
        return super().header_qc(series, rules, criteria)

    def load_hu(self, series: Series, geometry, pad_hu: float):
        if series.series_uid == "BUG-LOAD":
            raise IndexError(f"a bug, quoting {series.first.path}")
        return super().load_hu(series, geometry, pad_hu)


def test_an_unforeseen_exception_is_that_series_reject(tmp_path: Path) -> None:
    from dicom_factory import head_phantom, slice_positions, voxel_lps

    from headct.data import formats

    cfg = make_cfg(tmp_path)
    spec = SeriesSpec(**{**SMALL.__dict__})
    positions = slice_positions(spec)
    hu = np.stack([np.rint(head_phantom(voxel_lps(spec, p))) for p in positions])
    for uid in ("OK", "BUG-QC", "BUG-LOAD"):
        write_toy(cfg.src / f"t-{uid}.json", hu + len(uid), study=f"S-{uid}", series=uid, patient="TOY-PAT-0001",
                  origin_lps=tuple(positions[0]), spacing_mm=(spec.slice_step, *spec.pixel_spacing))
    formats.register(BuggyFormat())
    try:
        summary, terminal = ingest_capturing(cfg)
    finally:
        formats.unregister("buggy")
    assert summary["accepted"] == 1 and summary["rejected"] == {"internal_error": 2}
    rejects = pd.read_csv(cfg.dest / store.REJECTS).set_index("series_id")
    assert rejects.loc[PSEUDO.series("BUG-QC"), "message"].startswith("QC failed unexpectedly (KeyError)")
    assert rejects.loc[PSEUDO.series("BUG-LOAD"), "message"].startswith("conversion failed unexpectedly (IndexError)")
    assert str(cfg.src) not in (cfg.dest / store.REJECTS).read_text()
    lines = [line for line in terminal.splitlines() if "(internal_error)" in line]
    assert len(lines) == 2 and all("a bug, quoting" in line for line in lines), terminal
    assert_nothing_half_written(cfg.dest)


def test_a_report_folder_that_is_a_file_is_refused_first(tmp_path: Path, job_ctx) -> None:
    from pipelines.ingest import run

    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SMALL)
    cfg.report_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.report_dir.write_text("a file")
    with pytest.raises(InputError, match="ingest report folder .* is a file"):
        run(cfg, job_ctx)
    assert not cfg.dest.exists() and not cfg.linkage.exists()  # refused before the store was written


def write_deflate_bomb(path: Path, inflated_mib: int) -> int:
    """A Deflated Explicit VR Little Endian file whose dataset is a valid CT header followed by PixelData of
    `inflated_mib` MiB of zeros: a few hundred kB on disk. Returns the file's size."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_series(path.parent / "model", SeriesSpec(n_slices=1))
    ds = pydicom.dcmread(next((path.parent / "model").iterdir()))
    shutil.rmtree(path.parent / "model")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    n = inflated_mib << 20
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        fh.write(deflater.compress(header.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)))
        zeros = bytes(8 << 20)
        for _ in range(n // len(zeros)):
            fh.write(deflater.compress(zeros))
        fh.write(deflater.flush())
    return path.stat().st_size


def test_a_deflated_file_that_inflates_beyond_the_bound_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    from headct.data.discovery import read_headers
    from headct.data.formats.dicom import MAX_INFLATED

    cfg = make_cfg(tmp_path)
    bomb = cfg.src / "bomb" / "CT000000.dcm"
    bomb.parent.mkdir(parents=True)
    assert write_deflate_bomb(bomb, (MAX_INFLATED >> 20) + 64) < 2 << 20  # under 2 MB on disk
    tracemalloc.start()
    try:
        found = read_headers([bomb], cfg.src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.headers == [] and "inflates beyond 512 MiB" in found.bad_files[0][1]
    assert peak < 64 << 20  # pydicom alone would hold the 576 MiB inflated dataset
    write_series(cfg.src / "good", SeriesSpec(n_slices=8))
    summary, terminal = ingest_capturing(cfg)
    assert summary["accepted"] == 1 and summary["files_unreadable"] == 1
    assert "bomb/CT000000.dcm" in terminal and "inflates beyond" in terminal
