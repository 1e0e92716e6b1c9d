"""The store side of ingest: duplicates, shards + merge, NIfTI export, contact sheet, the memory-aware worker count."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from ingest_helpers import TEST_KEY, make_cfg, run_ingest  # noqa: E402

from headct.data import shards, store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402
from headct.data.parallel import choose_workers, series_bytes  # noqa: E402
from headct.errors import InputError  # noqa: E402

PSEUDO = Pseudonymizer(TEST_KEY.encode())


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def rejects_of(dest: Path) -> pd.DataFrame:
    return pd.read_csv(dest / store.REJECTS, dtype=str, keep_default_na=False)


# ------------------------------------------------------------------------------------------------- duplicates
def test_a_folder_exported_twice_is_read_once(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "export1" / "s", SeriesSpec(n_slices=12))
    shutil.copytree(cfg.src / "export1", cfg.src / "export2")  # the same files (same UIDs) again
    summary = run_ingest(cfg)
    assert (summary["accepted"], summary["files_repeated"], summary["rejected"]) == (1, 12, {})


def test_the_same_pixels_under_new_uids_are_a_duplicate_naming_the_kept_series(tmp_path: Path) -> None:
    """A re-anonymised re-export (new patient, study and series UIDs, same pixels) must not enter the store twice:
    it would be a different 'patient' and could land in another split."""
    cfg = make_cfg(tmp_path)
    uids = [generate_uid(), generate_uid()]
    write_series(cfg.src / "a", SeriesSpec(), patient_id="PID-ORIG-0001", series_uid=uids[0])
    write_series(cfg.src / "b", SeriesSpec(transfer_syntax="rle"), patient_id="PID-ANON-0002", series_uid=uids[1])
    summary = run_ingest(cfg)
    kept, dropped = sorted(PSEUDO.series(u) for u in uids)
    assert summary["accepted"] == 1 and summary["rejected"] == {"duplicate": 1}
    assert store.read_manifest(cfg.dest)["scan_id"].tolist() == [kept]
    reject = rejects_of(cfg.dest).iloc[0]
    assert reject["series_id"] == dropped and kept in reject["message"] and "pixel content" in reject["message"]
    assert not (cfg.dest / store.volume_relpath(dropped)).exists()


def test_the_same_sop_instances_with_other_pixels_are_a_duplicate(tmp_path: Path) -> None:
    """The same instances re-encoded (e.g. lossy on export): pixels differ, SOPInstanceUIDs do not."""
    cfg = make_cfg(tmp_path)
    sops = [generate_uid() for _ in range(32)]
    write_series(cfg.src / "a", SeriesSpec(sop_uids=sops), patient_id="PID-SOP-00001")
    write_series(cfg.src / "b", SeriesSpec(sop_uids=sops, slope=2.0, intercept=-1025.0), patient_id="PID-SOP-00002")
    summary = run_ingest(cfg)
    assert summary["rejected"] == {"duplicate": 1}
    assert "SOP instances" in rejects_of(cfg.dest)["message"].iloc[0]


def test_the_chosen_series_exported_twice_within_its_study_is_a_duplicate_not_a_competitor(tmp_path: Path) -> None:
    """The same instances under a second series UID in the same study: reported as a copy of the kept series."""
    cfg = make_cfg(tmp_path)
    sops, study = [generate_uid() for _ in range(32)], generate_uid()
    write_series(cfg.src / "a", SeriesSpec(sop_uids=sops), study_uid=study, patient_id="PID-TWICE-001")
    write_series(cfg.src / "b", SeriesSpec(sop_uids=sops), study_uid=study, patient_id="PID-TWICE-001")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 1 and summary["rejected"] == {"duplicate": 1}
    kept = store.read_manifest(cfg.dest)["scan_id"].iloc[0]
    reject = rejects_of(cfg.dest).iloc[0]
    assert "SOP instances" in reject["message"] and kept in reject["message"]


# -------------------------------------------------------------------------------------------- shards + merge
def write_source(src: Path) -> None:
    """Six studies: four plain, one with two series, and one re-export of the first (a duplicate across studies)."""
    for i in range(4):
        write_series(src / f"p{i}", SeriesSpec(centre=(0.0, 0.0, 1.5 * i)), patient_id=f"PID-SHARD-{i:04d}")
    study = generate_uid()
    write_series(src / "two" / "soft", SeriesSpec(centre=(0.0, 0.0, 7.0)), study_uid=study, patient_id="PID-TWO-0001")
    write_series(src / "two" / "bone", SeriesSpec(centre=(0.0, 0.0, 8.0), kernel="H70h"), study_uid=study,
                 patient_id="PID-TWO-0001")
    write_series(src / "again", SeriesSpec(centre=(0.0, 0.0, 0.0)), patient_id="PID-AGAIN-0001")


def test_shards_merged_equal_an_unsharded_run(tmp_path: Path, mlflow_store: str, monkeypatch) -> None:
    import cli

    whole = make_cfg(tmp_path / "whole")
    write_source(whole.src)
    summary = run_ingest(whole)
    assert summary["rejected"] == {"duplicate": 1, "not_selected": 1}

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(
        f"tracking:\n  uri: {mlflow_store}\n  experiment: shards\ningest:\n  export_nifti: true\n"
        "  qc:\n    min_slices: 8\n    min_coverage_mm: 30\n  preprocess:\n    shape: [32, 32, 32]\n    spacing_mm: 6.0\n"
    )
    monkeypatch.chdir(project)
    runner = CliRunner()
    studies = set()
    for k in (1, 2):
        result = runner.invoke(cli.app, ["ingest", str(whole.src), "sharded", "--shard", f"{k}/2", "--workers", "1"])
        assert result.exit_code == 0, result.output
        studies |= set(store.read_manifest(project / "sharded" / "shards" / f"{k}of2")["study_id"])
    assert not (project / "sharded" / store.MANIFEST).exists()  # not a store until merged
    early = runner.invoke(cli.app, ["ingest", "merge", "sharded", "missing-store"])
    assert early.exit_code == 1 and "missing-store" in early.output
    result = runner.invoke(cli.app, ["ingest", "merge", "sharded"])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.output and "duplicate" in result.output  # the summary table

    merged = project / "sharded"
    a, b = store.read_manifest(whole.dest), store.read_manifest(merged)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(rejects_of(whole.dest), rejects_of(merged))
    assert (whole.dest / store.LABELS).read_text() == (merged / store.LABELS).read_text()
    for relpath in a["volume"]:
        assert (whole.dest / relpath).read_bytes() == (merged / relpath).read_bytes()
    assert sorted(p.name for p in (merged / store.VOLUMES).iterdir()) == sorted(f"{s}.npy" for s in a["scan_id"])
    link_whole = pd.read_csv(whole.linkage).sort_values("scan_id").reset_index(drop=True)
    link_merged = pd.read_csv(project / "private" / "linkage" / "sharded.csv").sort_values("scan_id")
    assert link_whole["status"].tolist() == link_merged["status"].tolist()
    # NIfTI exports: the canonical volume with the manifest's affine
    row = b.iloc[0]
    image = nib.load(merged / store.nifti_relpath(row["scan_id"]))
    assert np.array_equal(np.asarray(image.dataobj), store.read_volume(merged, row["volume"]))
    assert np.allclose(image.affine, store.affine_of(row)) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert (project / "reports" / "ingest" / "contact_sheet.png").is_file()


def test_merge_refuses_missing_shards_and_conflicting_duplicates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_source(src)
    for k in (1, 2):
        run_ingest(make_cfg(tmp_path, shard=f"{k}/2"))
    dest = tmp_path / "store"
    linkage = tmp_path / "private" / "merged.csv"
    other = tmp_path / "other"
    # study UIDs are random, so either shard may hold no scan; copy one that holds some
    full = next(name for name in ("1of2", "2of2") if len(store.read_manifest(dest / "shards" / name)))
    shutil.copytree(dest / "shards" / full, other / "shards" / full)
    manifest = store.read_manifest(other / "shards" / full)
    manifest.loc[0, "volume_sha256"] = "0" * 64  # the same scan, another volume
    manifest.to_parquet(other / "shards" / full / store.MANIFEST)
    with pytest.raises(InputError, match="conflicting duplicates"):
        shards.merge([dest, other], linkage)
    shutil.rmtree(dest / "shards" / "2of2")
    with pytest.raises(InputError, match="2/2 missing"):
        shards.merge([dest], linkage)
    assert not (dest / store.MANIFEST).exists()


def test_shards_partition_studies_deterministically() -> None:
    ids = [PSEUDO.study(generate_uid()) for _ in range(200)]
    owners = [[k for k in range(1, 5) if shards.Shard(k, 4).holds(s)] for s in ids]
    assert all(len(o) == 1 for o in owners)  # every study in exactly one shard
    sizes = np.bincount([o[0] for o in owners])[1:]
    assert sizes.min() > 25  # roughly balanced (50 expected each)


# ------------------------------------------------------------------------------------------- workers, resume
def test_worker_count_is_capped_by_memory() -> None:
    from headct.config import PreprocessSpec
    from headct.data.series import Series, SliceHeader

    header = SliceHeader(path=Path("/x"), study_uid="1", series_uid="2", patient_id="", modality="CT",
                         image_type=(), sop_class_uid="", rows=512, cols=512, pixel_spacing=(0.5, 0.5),
                         orientation=None, position=None, frames=1, slice_thickness=None, kernel="", kvp=None,
                         manufacturer="", body_part="", series_description="", contrast_agent="")
    big = Series("1", "2", (header,) * 1000)  # 1,000 slices of 512 x 512
    need = series_bytes(big, PreprocessSpec())
    assert 1.2e9 < need < 1.5e9  # ~1.05 GB of float32 stack + process and scratch
    assert choose_workers(8, need, available=4 * 2**30)[0] == 2  # 80 % of 4 GiB holds two
    assert choose_workers(1, need, available=1 * 2**30)[0] == 1  # never fewer than one
    workers, why = choose_workers("auto", need, available=64 * 2**30)
    assert workers >= 1 and "memory allows" in why


def test_interrupted_conversion_resumes_without_redoing_finished_volumes(tmp_path: Path, monkeypatch) -> None:
    """Killed mid-way through converting (after the first study): the journal keeps the finished one."""
    cfg = make_cfg(tmp_path)
    _interrupted_after_one_study(cfg, monkeypatch)
    assert not (cfg.dest / store.MANIFEST).exists() and (cfg.dest / store.JOURNAL).is_file()
    summary = run_ingest(cfg)
    assert (summary["accepted"], summary["reused"], summary["converted"]) == (3, 1, 2)


def _interrupted_after_one_study(cfg, monkeypatch) -> None:
    """Three studies; the run dies while converting the second: the journal holds the first one's row."""
    from headct.data import ingest as ingest_module

    for i in range(3):
        write_series(cfg.src / f"p{i}", SeriesSpec(n_slices=8, centre=(0.0, 0.0, 1.5 * i)), patient_id=f"PIDJRN{i:05d}")
    real, calls = ingest_module.convert_study, []

    def dies_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ingest_module, "convert_study", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg)
    monkeypatch.undo()
    monkeypatch.setenv(KEY_ENV, TEST_KEY)  # undo() also removed the key the autouse fixture set
    assert len((cfg.dest / store.JOURNAL).read_text().splitlines()) == 1


def _ingest_printing(cfg) -> tuple[dict, str]:
    import io

    from rich.console import Console

    from headct.data.ingest import ingest

    out = io.StringIO()
    summary = ingest(cfg, cfg.src.parent, Console(file=out, width=400)).summary
    return summary, out.getvalue()


def test_a_torn_last_journal_line_is_dropped_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(tmp_path)
    _interrupted_after_one_study(cfg, monkeypatch)
    journal = cfg.dest / store.JOURNAL
    with journal.open("a") as fh:
        fh.write('{"scan_id": "ser_0123')  # killed in the middle of writing a row: no final newline
    summary, printed = _ingest_printing(cfg)
    assert (summary["accepted"], summary["reused"], summary["converted"]) == (3, 1, 2)
    assert f"{journal}: dropped a torn last line (line 2" in printed


@pytest.mark.parametrize("damage", ["garbage in the middle", "complete but malformed last line"])
def test_any_other_malformed_journal_line_is_an_error_naming_the_file_and_line(
    tmp_path: Path, monkeypatch, damage: str
) -> None:
    cfg = make_cfg(tmp_path)
    _interrupted_after_one_study(cfg, monkeypatch)
    journal = cfg.dest / store.JOURNAL
    row = journal.read_text()
    if damage == "garbage in the middle":
        journal.write_text("not json at all\n" + row)
        line = 1
    else:
        journal.write_text(row + '{"scan_id": "ser_0"}\n')  # parses, ends with a newline, lacks the facts
        line = 2
    with pytest.raises(InputError, match=rf"{journal}: line {line} is not a journal row"):
        run_ingest(cfg)


def test_an_unreadable_manifest_stops_ingest_naming_the_file(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "a", SeriesSpec(n_slices=8), patient_id="PIDMANIF01")
    assert run_ingest(cfg)["accepted"] == 1
    (cfg.dest / store.MANIFEST).write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(InputError, match=rf"{cfg.dest / store.MANIFEST}: the store's manifest is not a readable"):
        run_ingest(cfg)


def test_a_manifest_of_an_older_layout_is_converted_again_with_a_note(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "a", SeriesSpec(n_slices=8), patient_id="PIDMANIF02")
    assert run_ingest(cfg)["accepted"] == 1
    path = cfg.dest / store.MANIFEST
    pd.read_parquet(path).drop(columns=["content_sha256"]).to_parquet(path, index=False)
    summary, printed = _ingest_printing(cfg)
    assert (summary["converted"], summary["reused"]) == (1, 0)
    assert f"{path}: an older layout without ['content_sha256']; its volumes are converted again" in printed


def test_journal_rows_of_an_older_layout_are_converted_again_with_a_note(tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(tmp_path)
    _interrupted_after_one_study(cfg, monkeypatch)
    journal = cfg.dest / store.JOURNAL
    row = json.loads(journal.read_text())
    journal.write_text(json.dumps({k: v for k, v in row.items() if k not in store.CROP_COLUMNS}) + "\n")
    summary, printed = _ingest_printing(cfg)  # a journal written before the crop columns existed
    assert (summary["accepted"], summary["reused"], summary["converted"]) == (3, 0, 3)
    assert (f"{journal}: 1 row(s) of an older layout without ['crop_x_mm', 'crop_y_mm', 'crop_z_mm']; their "
            "volumes are converted again") in " ".join(printed.split())
