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


LABELS = ("ICH", "IPH", "MassEffect", "SDH", "SAH")


def _plant(project: Path, n_patients: int) -> tuple[Path, Path, set[str]]:
    """Series with planted identifiers (names, record numbers as PatientID, UIDs) under a SRC folder named after a
    patient, each in a series folder named after a patient; a labels table keyed by PatientID. Returns SRC, the
    labels file and every planted string."""
    src = project / "data" / "raw" / SRC_NAME  # inside the project, so a relative path would name it
    needles = {SRC_NAME, "Doe^Jane", "MRN7731904"}
    labels = []
    for i in range(n_patients):
        patient_id, name = f"PLANTEDID{i:03d}X", f"Plantedname^Person{i}"
        study_uid, series_uid = f"1.2.826.0.1.3680043.8.498.4242{i:02d}1", f"1.2.826.0.1.3680043.8.498.4242{i:02d}2"
        folder = src / f"SMITH_JOHN_{i}" / "CT HEAD"  # a patient's name as a folder under SRC
        write_series(folder, SeriesSpec(n_slices=8 + i, rows=40, cols=40), patient_id=patient_id,
                     patient_name=name, study_uid=study_uid, series_uid=series_uid)
        needles |= {patient_id, name, study_uid, series_uid, f"SMITH_JOHN_{i}"}
        labels.append({"patient": patient_id, **{label: (i >> k) % 2 for k, label in enumerate(LABELS)}})
    labels_file = project / "data" / "raw" / "labels.csv"
    pd.DataFrame(labels).to_csv(labels_file, index=False)
    return src, labels_file, needles


def _search(project: Path, inputs: set[Path], needles: set[str]) -> int:
    """Search every file under the project but the inputs and the local linkage folder; returns how many."""
    private = project / "private"
    searched = 0
    for path in sorted(project.rglob("*")):
        if not path.is_file() or path.is_relative_to(private) or any(path.is_relative_to(p) for p in inputs):
            continue
        searched += 1
        for text in _texts(path):
            found = sorted(n for n in needles if n in text)
            assert not found, f"{found} in {path.relative_to(project)}"
    return searched


def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", TEST_KEY)
    monkeypatch.delenv("HEADCT_PSEUDONYM_KEY_FILE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_planted_identifiers_reach_no_output_no_mlflow_record_and_no_artifact(tmp_path: Path,
                                                                             monkeypatch) -> None:
    _key_env(monkeypatch)
    project = tmp_path / "project"
    src, labels_file, needles = _plant(project, N_PATIENTS)
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
    searched = _search(project, {src, labels_file}, needles)
    assert searched >= 10  # store tables, volumes, reports, split files, mlflow.db, artifacts
    # the local linkage file is where the source keys live (proving the needles were there to be found)
    linkage = (project / "private" / "linkage" / "site.csv").read_text()
    assert "SMITH_JOHN_0" in linkage and "1.2.826.0.1.3680043.8.498.4242002" in linkage


# Every job of the quick profile's chain on the planted data, at the quick profile's sizes or smaller (the demo's
# default paths: data/store/synth, data/splits/synth, models/..., reports/...).
CHAIN_PARAMS = """tracking:
  experiment: privacy-chain
ingest:
  src: data/raw/SRC
  labels: data/raw/labels.csv
  labels_format: table
  patient_key: dicom
  workers: 1
  preprocess: {shape: [32, 32, 32], spacing_mm: 6.0}
  qc: {min_slices: 8, min_coverage_mm: 30.0}
split: {fractions: [0.5, 0.25, 0.25], labelled_train: 6}
pretrain: {arch: tiny, patch_size: 16, batch_size: 4, samples: 16, log_every: 2, checkpoint_every: 4,
           eval_volumes: 2, method: mae, lr: 1.0e-3}
extract: {batch_size: 8, random_init_seeds: [0], pools: [cls, mean], blocks: [-1]}
probe: {bootstrap: 20, c_grid: [0.1, 1.0], select_by: null}
fewshot: {shots: [1, 2], seeds: 2, select_by: null}
retrieval: {split: test}
compare: {labels: [IPH], shots: [2], bootstrap: 20, ceiling_predictions: reports/ceiling/predictions.csv}
finetune: {epochs: 1, batch_size: 4, bootstrap: 20, tuned_params: null, drop_path_rate: 0.0}
ceiling: {epochs: 1, batch_size: 4, bootstrap: 20}
explain: {methods: [cls, rollout, occlusion], slices: 3}
report: {compare_metrics: reports/compare/metrics.json}
"""
CHAIN = ("split", "pretrain", "extract", "probe", "fewshot", "retrieval", "finetune", "ceiling", "compare",
         "explain", "report")


@pytest.mark.slow
def test_planted_identifiers_reach_no_output_of_any_job_of_the_chain(tmp_path: Path, monkeypatch) -> None:
    """ingest, then every job of the quick chain, then `headct predict` on a patient-named study folder with a JSON
    output: no file any of them wrote, no MLflow record and no artifact holds a planted identifier."""
    _key_env(monkeypatch)
    project = tmp_path / "project"
    src, labels_file, needles = _plant(project, 16)
    (project / "params.yaml").write_text(CHAIN_PARAMS.replace("data/raw/SRC", f"data/raw/{SRC_NAME}"))
    _cli(["ingest"], project, monkeypatch)
    for job in CHAIN:
        _cli([job], project, monkeypatch)
    study = src / "SMITH_JOHN_15"  # 23 slices: 110 mm, enough for predict's own QC (min_coverage_mm 80)
    _cli(["predict", str(study), "--set", "predict.out=reports/predict/result.json"], project, monkeypatch)
    assert (project / "reports" / "predict" / "result.json").is_file()
    # every job ran and logged (finished MLflow runs), and wrote where the search below looks
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    jobs = {"ingest", *CHAIN} - {"ceiling"}  # `headct ceiling` runs the finetune job (its run is tagged so)
    assert jobs <= {r.data.tags.get("headct.job") for r in runs if r.info.status == "FINISHED"}
    assert (project / "reports" / "ceiling" / "predictions.csv").is_file()
    searched = _search(project, {src, labels_file, project / "params.yaml"}, needles)  # less the inputs
    assert searched >= 40  # store, splits, features, models, checkpoints, reports, mlflow.db, artifacts
