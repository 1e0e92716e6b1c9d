"""Privacy end to end (issue 12): identifiers planted in DICOM, in the SRC folder's name and in the series
folders' names never reach a file headct writes for sharing, MLflow's database or its artifacts.

`headct ingest` and `headct split` run through the command line against a real SQLite MLflow store inside the
project; then every output file, the whole database (an SQL dump) and every artifact is searched for the planted
strings. Only the local linkage file (private/, kept out of Git, DVC, MLflow and reports) may hold them.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from ingest_helpers import TEST_KEY  # noqa: E402

N_PATIENTS = 8
SRC_NAME = "Doe^Jane 19700101 MRN7731904"  # an export folder named after a patient, as PACS tools do


def _cli(args: list[str], project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import cli

    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def _texts(path: Path) -> list[str]:
    """What a search must cover in one file: its bytes (latin-1 keeps every byte), a parquet table as CSV, and
    an SQLite database as its SQL dump."""
    data = path.read_bytes()
    texts = [data.decode("latin-1")]
    if path.suffix == ".parquet":
        texts.append(pd.read_parquet(path).to_csv())
    if data.startswith(b"SQLite format 3"):
        with sqlite3.connect(path) as db:
            texts.append("\n".join(db.iterdump()))
    return texts


def test_planted_identifiers_reach_no_output_no_mlflow_record_and_no_artifact(tmp_path: Path,
                                                                             monkeypatch) -> None:
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", TEST_KEY)
    monkeypatch.delenv("HEADCT_PSEUDONYM_KEY_FILE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    src = project / "data" / "raw" / SRC_NAME  # inside the project, so a relative path would name it
    needles = {SRC_NAME, "Doe^Jane", "MRN7731904"}
    labels = []
    for i in range(N_PATIENTS):
        patient_id, name = f"PLANTEDID{i:03d}X", f"Plantedname^Person{i}"
        study_uid, series_uid = f"1.2.826.0.1.3680043.8.498.4242{i}1", f"1.2.826.0.1.3680043.8.498.4242{i}2"
        folder = src / f"SMITH_JOHN_{i}" / "CT HEAD"  # a patient's name as a folder under SRC
        write_series(folder, SeriesSpec(n_slices=8 + i, rows=40, cols=40), patient_id=patient_id,
                     patient_name=name, study_uid=study_uid, series_uid=series_uid)
        needles |= {patient_id, name, study_uid, series_uid, f"SMITH_JOHN_{i}"}
        labels.append({"patient": patient_id, "ICH": i % 2})
    labels_file = project / "data" / "raw" / "labels.csv"
    pd.DataFrame(labels).to_csv(labels_file, index=False)
    (project / "params.yaml").write_text(
        "tracking:\n  experiment: privacy\n"
        "ingest:\n  labels: data/raw/labels.csv\n  labels_format: table\n  patient_key: dicom\n  workers: 1\n"
        "  preprocess:\n    shape: [32, 32, 32]\n    spacing_mm: 6.0\n"
        "  qc:\n    min_slices: 8\n    min_coverage_mm: 30.0\n"
        "split:\n  store: data/store/site\n  out: data/splits/site\n  counts: {val: 2, test: 2}\n"
    )
    _cli(["ingest", str(src), "data/store/site"], project, monkeypatch)
    _cli(["split"], project, monkeypatch)

    assert len(pd.read_parquet(project / "data" / "store" / "site" / "manifest.parquet")) == N_PATIENTS
    assert (project / "mlflow.db").is_file() and any((project / "mlartifacts").rglob("split.json"))
    inputs = {src, labels_file}
    private = project / "private"
    searched = 0
    for path in sorted(project.rglob("*")):
        if not path.is_file() or path.is_relative_to(private) or any(path.is_relative_to(p) for p in inputs):
            continue
        searched += 1
        for text in _texts(path):
            found = sorted(n for n in needles if n in text)
            assert not found, f"{found} in {path.relative_to(project)}"
    assert searched >= 10  # store tables, volumes, reports, split files, mlflow.db, artifacts
    # the local linkage file is where the source keys live (proving the needles were there to be found)
    linkage = (private / "linkage" / "site.csv").read_text()
    assert "SMITH_JOHN_0" in linkage and "1.2.826.0.1.3680043.8.498.424202" in linkage
