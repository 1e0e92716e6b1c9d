"""Label sources (headct/data/label_sources): the registry seam, RSNA 2019 per-slice labels, the generic table.

Every source is exercised with real files: DICOM written with pydicom (tests/dicom_factory.py) and CSV/JSON
labels, through the real ingest.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_label_source  # noqa: E402
from dicom_factory import SeriesSpec, nifti_of, write_series  # noqa: E402
from ingest_helpers import TEST_KEY, make_cfg, run_ingest  # noqa: E402

from headct.config import ConfigError, IngestConfig  # noqa: E402
from headct.data import label_sources, store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402
from headct.data.label_sources.base import LabelRows  # noqa: E402
from headct.data.label_sources.rsna2019 import SUBTYPES, read_rsna  # noqa: E402
from headct.errors import InputError  # noqa: E402

PSEUDO = Pseudonymizer(TEST_KEY.encode())
RSNA_LABELS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH"]  # LABELS order of the six mapped subtypes
# the challenge's files carry non-standard UIDs (`ID_<hex>`), which pydicom writes and reads with a warning
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def labels_by_scan(cfg: IngestConfig) -> pd.DataFrame:
    return pd.read_csv(cfg.dest / store.LABELS, dtype=str, keep_default_na=False).set_index("scan_id")


def series_at(folder: Path, series_uid: str, z: float = 0.0, **kw) -> list[Path]:
    """One 8-slice series in its own study (centres differ so no two volumes are duplicates)."""
    return write_series(folder, SeriesSpec(n_slices=8, centre=(0.0, 0.0, z), **kw), series_uid=series_uid)


# ------------------------------------------------------------------------------------------------ the seam
def test_a_new_source_is_one_file_registered_through_the_registry(tmp_path: Path, job_ctx) -> None:
    from pipelines.ingest import run

    source = label_sources.register(toy_label_source.SOURCE)
    try:
        cfg = make_cfg(tmp_path, labels=tmp_path / "labels.json", labels_format="toy_json")
        studies = [generate_uid() for _ in range(3)]
        for i, study in enumerate(studies):
            write_series(cfg.src / f"s{i}", SeriesSpec(n_slices=8, centre=(0.0, 0.0, 2.5 * i)), study_uid=study)
        cfg.labels.write_text(json.dumps({studies[0]: {"ICH": 1, "Tumor": 0}, studies[1]: {"ICH": 0, "Tumor": None},
                                          "1.2.3.4.5": {"ICH": 1, "Tumor": 1}}))
        summary = run(cfg, job_ctx)
        assert summary["accepted"] == 3 and summary["unlabelled_scans"] == 1
        assert summary["label_keys_unmatched"] == 1  # the study not in SRC
        labels = pd.read_csv(cfg.dest / store.LABELS, dtype=str, keep_default_na=False)
        assert list(labels.columns) == ["scan_id", "patient_id", "ICH", "Tumor"]
        manifest = store.read_manifest(cfg.dest).set_index("study_id")["scan_id"]
        by_scan = labels.set_index("scan_id")
        got = [by_scan.loc[manifest[PSEUDO.study(s)], ["ICH", "Tumor"]].tolist() for s in studies]
        assert got == [["1", "0"], ["0", ""], ["", ""]]
        assert not any(s in (cfg.dest / store.LABELS).read_text() for s in studies)  # pseudonyms only
    finally:
        label_sources.unregister(source.name)
    # Unregistered again: refused when ingest starts (exit 2 from the CLI), before any work, naming the known ones.
    with pytest.raises(ConfigError, match="unknown label source 'toy_json'; known: none, cq500, rsna2019, table"):
        label_sources.load(make_cfg(tmp_path, labels=tmp_path / "labels.json", labels_format="toy_json"))
    with pytest.raises(ValidationError, match="labels_format must be a label source's name"):
        IngestConfig(labels_format="toy-json")


def test_registry_refuses_clashes_and_sources_that_break_the_protocol(tmp_path: Path) -> None:
    class Bad:
        name = "bad_rows"

        def read(self, cfg) -> LabelRows:  # lower-case label column, float values
            return LabelRows(cfg.labels, "patient", pd.DataFrame({"ich": [1.0]}, index=["P1"]))

    with pytest.raises(ValueError, match="already registered"):
        label_sources.register(type("Clash", (), {"name": "cq500", "read": Bad.read})())
    with pytest.raises(ValueError, match="identifier"):
        label_sources.register(type("NoName", (), {"name": "none", "read": Bad.read})())
    label_sources.register(Bad())
    try:
        (tmp_path / "x.csv").write_text("x\n")
        cfg = make_cfg(tmp_path, labels=tmp_path / "x.csv", labels_format="bad_rows")
        with pytest.raises(InputError, match=r"x.csv: label source 'bad_rows' returned bad rows: columns must"):
            label_sources.load(cfg)
    finally:
        label_sources.unregister("bad_rows")


# ---------------------------------------------------------------------------------------------------- RSNA
def rsna_rows(uids: list[str], positive: dict[int, set[str]] | None = None) -> list[tuple[str, str]]:
    """(ID, Label) rows for the slices `uids`: 1 for subtypes in positive[slice index], else 0."""
    positive = positive or {}
    return [(f"ID_{uid.removeprefix('ID_')}_{subtype}", "1" if subtype in positive.get(k, set()) else "0")
            for k, uid in enumerate(uids) for subtype in SUBTYPES]


def write_rsna_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    random.Random(0).shuffle(rows)  # the join must not depend on the file's order
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
    return path


def test_rsna_exam_label_is_the_max_over_its_slices(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, labels=tmp_path / "stage_2_train.csv", labels_format="rsna2019")
    # A: the challenge's UID style; B, C, D: ordinary UIDs (a re-export), rows still `ID_<uid>_<subtype>`
    uids = {"A": [f"ID_{k:09x}" for k in range(8)]} | {s: [generate_uid() for _ in range(8)] for s in "BCD"}
    series = {s: generate_uid() for s in "ABCD"}
    for i, name in enumerate("ABCD"):
        series_at(cfg.src / name, series[name], 2.5 * i, sop_uids=uids[name])
    rows = rsna_rows(uids["A"], {3: {"subdural", "any"}})  # one positive slice: the exam is SDH + ICH
    rows.append(rows[0])  # an exact duplicate
    rows += rsna_rows(uids["B"])
    rows.append((f"ID_{uids['B'][5]}_epidural", "1"))  # contradicts B's slice 5 (0): unknown, so B's EDH is unproven
    rows += rsna_rows(uids["C"][:4], {2: {"intraparenchymal", "any"}})  # half of C's slices labelled
    rows += rsna_rows(["ID_0ffff0001", "ID_0ffff0002"])  # slices not in SRC
    write_rsna_csv(cfg.labels, rows)
    summary = run_ingest(cfg)
    assert summary["accepted"] == 4 and summary["unlabelled_scans"] == 1  # D
    assert summary["label_rows_duplicated"] == 2 and summary["label_values_conflicting"] == 1
    assert summary["label_scans_partial"] == 1 and summary["label_keys_unmatched"] == 2
    labels = labels_by_scan(cfg)
    assert list(labels.columns) == ["patient_id", *RSNA_LABELS]
    got = {name: labels.loc[PSEUDO.series(uid), RSNA_LABELS].tolist() for name, uid in series.items()}
    assert got["A"] == ["1", "0", "0", "1", "0", "0"]
    assert got["B"] == ["0", "0", "0", "0", "", "0"]
    assert got["C"] == ["1", "1", "", "", "", ""]  # positives are proven by one slice, negatives need all
    assert got["D"] == [""] * 6
    text = (cfg.dest / store.LABELS).read_text() + json.dumps(summary)
    assert not any(uid in text for uid in [*uids["B"], "ID_000000003", *series.values()])  # no UID leaves ingest


def test_rsna_reading_is_the_same_in_any_chunking_and_refuses_bad_rows(tmp_path: Path) -> None:
    uids = [generate_uid() for _ in range(5)]
    rows = rsna_rows(uids, {1: {"any", "subarachnoid"}}) + [(f"ID_{uids[0]}_any", "0")] * 2
    path = write_rsna_csv(tmp_path / "stage_2_train.csv", rows)
    whole = read_rsna(path)
    for chunk_rows in (1, 7):  # duplicates split across chunks are still counted once per extra row
        part = read_rsna(path, chunk_rows=chunk_rows)
        pd.testing.assert_frame_equal(part.table.sort_index(), whole.table.sort_index())
        assert part.counts == whole.counts == {"label_rows_duplicated": 2, "label_values_conflicting": 0}
    assert whole.level == "instance" and list(whole.table.columns) == RSNA_LABELS
    assert whole.table.loc[uids[1], ["ICH", "SAH", "SDH"]].tolist() == [1, 1, 0]
    for bad, why in [([("ID_abc_haematoma", "1")], "not ID_<SOPInstanceUID>_<subtype>"),
                     ([("abc_any", "1")], "not ID_"), ([("ID_abc_any", "2")], "Label must be 0 or 1, got '2'")]:
        write_rsna_csv(path, rsna_rows(uids[:1]) + bad)
        with pytest.raises(InputError, match=rf"stage_2_train.csv: data row \d+: .*{why}"):
            read_rsna(path, chunk_rows=4)
    path.write_text("Image,Label\nID_abc_any,1\n")
    with pytest.raises(InputError, match="expected the columns ID, Label"):
        read_rsna(path)


# --------------------------------------------------------------------------------------------------- table
def test_table_by_patient_id(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, labels=tmp_path / "labels.csv", labels_format="table", labels_key="patient",
                   labels_key_column="PatientID")
    write_series(cfg.src / "a", SeriesSpec(n_slices=8), patient_id="PATIENT-A1")
    write_series(cfg.src / "b", SeriesSpec(n_slices=8, centre=(0.0, 0.0, 2.5)), patient_id="PATIENT-B2")
    cfg.labels.write_text("PatientID,Fracture,ICH\n PATIENT-A1 ,,1\nPATIENT-C3,0,0\n")
    summary = run_ingest(cfg)
    assert summary["unlabelled_scans"] == 1 and summary["label_keys_unmatched"] == 1
    labels = labels_by_scan(cfg).set_index("patient_id")
    assert list(labels.columns) == ["ICH", "Fracture"]  # canonical order, whatever the file's
    assert labels.loc[PSEUDO.patient("PATIENT-A1")].tolist() == ["1", ""]
    assert labels.loc[PSEUDO.patient("PATIENT-B2")].tolist() == ["", ""]
    assert "PATIENT" not in (cfg.dest / store.LABELS).read_text()


def test_table_by_path_takes_the_nearest_row(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, labels=tmp_path / "labels.csv", labels_format="table", labels_key="path")
    uid = {name: generate_uid() for name in ("a", "b", "c")}
    series_at(cfg.src / "site1" / "caseA" / "head", uid["a"])
    series_at(cfg.src / "site1" / "caseB" / "head", uid["b"], 2.5)
    series_at(cfg.src / "site2" / "caseC", uid["c"], 5.0)
    (cfg.src / "nifti").mkdir()
    nib.save(nifti_of(SeriesSpec(n_slices=8, centre=(0.0, 0.0, 7.5))), cfg.src / "nifti" / "case9.nii.gz")
    cfg.labels.write_text("path,ICH,SDH\nsite1,0,0\n./site1/caseA/,1,\nnifti/case9,1,1\nsite3,1,1\n")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 4 and summary["unlabelled_scans"] == 1  # site2/caseC
    labels = labels_by_scan(cfg)
    assert labels.loc[PSEUDO.series(uid["a"]), ["ICH", "SDH"]].tolist() == ["1", ""]  # its own row, not site1's
    assert labels.loc[PSEUDO.series(uid["b"]), ["ICH", "SDH"]].tolist() == ["0", "0"]  # site1's
    assert labels.loc[PSEUDO.series(uid["c"]), ["ICH", "SDH"]].tolist() == ["", ""]
    assert labels.loc[PSEUDO.series("nifti:nifti/case9"), ["ICH", "SDH"]].tolist() == ["1", "1"]
    assert summary["label_keys_unmatched"] == 1  # site3


def test_table_refuses_unknown_columns_and_a_missing_key_before_any_work(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, labels=tmp_path / "labels.csv", labels_format="table", labels_key="series")
    write_series(cfg.src / "a", SeriesSpec(n_slices=8))
    cfg.labels.write_text("series,ICH,Fractures\n1.2.3,1,0\n")
    with pytest.raises(InputError, match=r"labels.csv: column 'Fractures' is not a canonical label \(did you mean "
                                         r"'Fracture'\?\)"):
        run_ingest(cfg)
    cfg.labels.write_text("series,ICH,Category\n1.2.3,1,x\n")
    with pytest.raises(InputError, match="labels.csv: column 'Category' is not a canonical label"):
        run_ingest(cfg)
    cfg.labels.write_text("SeriesInstanceUID,ICH\n1.2.3,1\n")
    with pytest.raises(InputError, match="labels.csv: no key column 'series'"):
        run_ingest(cfg)
    cfg.labels.write_text("series,ICH\n1.2.3,yes\n")
    with pytest.raises(InputError, match=r"labels.csv: column 'ICH' must hold 0, 1 or nothing \(data row 1: 'yes'\)"):
        run_ingest(cfg)
    cfg.labels.write_text("series,ICH\n1.2.3,1\n1.2.3 ,0\n")
    with pytest.raises(InputError, match="1 key.* appear on more than one row"):
        run_ingest(cfg)
    assert not cfg.dest.exists()
    with pytest.raises(InputError, match="needs ingest.labels"):
        run_ingest(cfg.model_copy(update={"labels": None}))
