"""`headct import-splits fm-hct`: FM-HCT's published split files become headct split files over a store, matched
through the local linkage file; outputs hold pseudonyms only; what does not match is reported by count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from headct.data.fmhct_splits import import_fmhct_splits
from headct.data.identity import write_linkage
from headct.data.splits import read_splits
from headct.errors import InputError
from tests.store_helpers import write_store

CQ500_COLUMNS = ["img_path", "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                 "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift",
                 "Anomaly", "name"]


def _store(root: Path, n_patients: int = 8) -> pd.DataFrame:
    """A store of one scan per patient (patient 3 has two studies), its labels.csv and linkage file; -> linkage."""
    scans = [f"ser_{i:04d}" for i in range(n_patients)] + ["ser_0103"]
    patients = {s: f"pat_{int(s[4:]) % 100:04d}" for s in scans}
    write_store(root / "store", {s: np.zeros((8, 8, 8), np.int16) for s in scans}, patients)
    pd.DataFrame({"scan_id": scans, "patient_id": [patients[s] for s in scans],
                  "ICH": [int(s[-1]) % 2 for s in scans]}).to_csv(root / "store/labels.csv", index=False)
    link = pd.DataFrame({
        "scan_id": scans, "study_id": [f"stu_{s[4:]}" for s in scans], "patient_id": [patients[s] for s in scans],
        "status": "accepted", "patient_key": [f"CQ500CT{int(s[4:]) % 100}" for s in scans],
        "patient_key_source": "cq500_folder", "study_uid": [f"ID_{int(s[4:]):08x}" for s in scans],
        "series_uid": [f"1.2.3.{s[4:]}" for s in scans], "source_folder": "/private/CQ500CT0/x", "n_files": "32"})
    # a series of patient 0 that ingest set aside: in the linkage file, not in the store
    link.loc[len(link)] = ["ser_9999", "stu_0000", "pat_0000", "not_selected", "CQ500CT0", "cq500_folder",
                           "ID_00000000", "1.2.3.9999", "/private/x", "3"]
    write_linkage(root / "private/linkage/store.csv", link)
    return link


def _cq500_file(path: Path, patients: list[int]) -> Path:
    rows = [{**dict.fromkeys(CQ500_COLUMNS, 0), "img_path": f"/cq500/nifti/CQ500CT{p}_CT_PLAIN_THIN{suffix}.nii.gz",
             "name": f"CQ500-CT-{p}"} for p in patients for suffix in ("", "_Tilt_1")]  # two series rows each
    pd.DataFrame(rows, columns=CQ500_COLUMNS).to_csv(path, index=False)
    return path


def test_cq500_split_files_map_to_patients_through_the_linkage_file(tmp_path: Path, monkeypatch) -> None:
    import cli

    _store(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    files = {"train": _cq500_file(tmp_path / "cq500_train.csv", [0, 1, 2, 3, 42]),  # 42: not in the store
             "val": _cq500_file(tmp_path / "cq500_val.csv", [4, 5]),
             "test": _cq500_file(tmp_path / "cq500_test.csv", [6, 5])}  # 5 in val and test: left out
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["import-splits", "fm-hct", "store", "splits/fm",
                                          *[f"--{k}={v.name}" for k, v in files.items()]])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "splits/fm/split.json").read_text())
    assert summary["fmhct_rows"] == {"train": 10, "val": 4, "test": 4}
    assert summary["fmhct_rows_unmatched"] == {"train": 2, "val": 0, "test": 0}  # patient 42's two rows
    assert summary["patients_in_several_splits_left_out"] == 1 and summary["store_scans_in_no_file"] == 1  # pat 7
    assert summary["store"] == "store" and summary["labels"] == ["ICH"]
    splits = read_splits(tmp_path / "splits/fm")  # the project's reader: columns, labels, patient-disjointness
    assert {n: sorted(f["patient_id"]) for n, f in splits.items()} == {
        "train": ["pat_0000", "pat_0001", "pat_0002", "pat_0003", "pat_0003"],  # both studies of patient 3
        "val": ["pat_0004"], "test": ["pat_0006"]}
    assert list(splits["train"].columns) == ["img_path", "scan_id", "patient_id", "ICH"]
    assert (tmp_path / splits["train"]["img_path"].iloc[0]).is_file()
    shared = "".join((tmp_path / "splits/fm" / n).read_text() for n in ("train.csv", "val.csv", "test.csv",
                                                                         "split.json")) + result.output
    assert "CQ500" not in shared and "ID_" not in shared and "private" not in shared  # pseudonyms and counts only


def test_rsna_files_match_exams_by_study_uid_and_bad_inputs_are_named(tmp_path: Path) -> None:
    link = _store(tmp_path)
    columns = ["img_path", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any",
               "study_id"]

    def rsna(name: str, studies: list[str]) -> Path:
        pd.DataFrame([{**dict.fromkeys(columns, 0), "img_path": f"/rsna/nifti_img/{s}.nii.gz", "study_id": s}
                      for s in studies], columns=columns).to_csv(tmp_path / name, index=False)
        return tmp_path / name

    uid = dict(zip(link["scan_id"], link["study_uid"], strict=True))
    files = {"train": rsna("tr.csv", [uid["ser_0000"], uid["ser_0003"], "ID_deadbeef"]),
             "val": rsna("va.csv", [uid["ser_0001"]]), "test": rsna("te.csv", [uid["ser_0103"], uid["ser_0002"]])}
    summary = import_fmhct_splits(files, tmp_path / "store", tmp_path / "private/linkage/store.csv",
                                  tmp_path / "out", tmp_path)
    # patient 3's two exams fell in train and test (FM-HCT splits exams): the patient is left out of both
    assert summary["patients_in_several_splits_left_out"] == 1 and summary["fmhct_rows_unmatched"]["train"] == 1
    splits = read_splits(tmp_path / "out")
    assert {n: list(f["scan_id"]) for n, f in splits.items()} == {
        "train": ["ser_0000"], "val": ["ser_0001"], "test": ["ser_0002"]}

    cases = [
        ({**files, "val": _cq500_file(tmp_path / "cq.csv", [1])}, "mix kinds"),
        ({**files, "test": tmp_path / "nope.csv"}, r"nope\.csv: file not found"),
        ({"train": files["train"]}, "give one each"),
    ]
    (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
    cases.append(({**files, "val": tmp_path / "odd.csv"}, r"odd\.csv: not an FM-HCT split file"))
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            import_fmhct_splits(bad, tmp_path / "store", tmp_path / "private/linkage/store.csv", tmp_path / "o2",
                                tmp_path)
    other = link.assign(scan_id=[f"ser_x{i}" for i in range(len(link))])
    write_linkage(tmp_path / "other.csv", other)
    with pytest.raises(InputError, match="none of the store's scans"):
        import_fmhct_splits(files, tmp_path / "store", tmp_path / "other.csv", tmp_path / "o3", tmp_path)
