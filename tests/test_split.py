"""Split job: patient-disjoint, complete, seeded, stratified; files in the seed's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from headct.config import JobContext, SplitConfig
from headct.data.splits import SPLITS, load_store_table, make_split, read_split, read_splits, write_split
from headct.errors import InputError
from pipelines import split as split_job
from tests.conftest import runs_of
from tests.split_helpers import make_store


def run_split(root: Path, seed: int = 0, out: str = "data/splits/synth", ctx: JobContext | None = None) -> Path:
    cfg = SplitConfig(
        store=root / "data/store/synth", out=root / out, seed=seed, report_dir=root / "reports/split"
    )
    split_job.run(cfg, ctx or JobContext(root=root))
    return cfg.out


def test_split_is_patient_disjoint_and_covers_every_scan_once(tmp_path: Path, job_ctx) -> None:
    store = make_store(tmp_path)
    out = run_split(tmp_path, ctx=job_ctx)
    frames = read_splits(out)  # raises if a patient is in two splits
    patients = [set(f["patient_id"]) for f in frames.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    scans = pd.concat(frames.values())["scan_id"]
    manifest = pd.read_parquet(store / "manifest.parquet")
    assert sorted(scans) == sorted(manifest["scan_id"]) and not scans.duplicated().any()
    assert (tmp_path / "reports/split/metrics.json").is_file()
    (run,) = runs_of(job_ctx)
    assert run.data.metrics  # one real MLflow run with its counts, named and tagged for the store it splits
    assert (run.info.run_name, run.data.tags["headct.store"]) == (f"split {store.name}", store.name)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path, job_ctx) -> None:
    make_store(tmp_path)
    names = [f"{s}.csv" for s in SPLITS] + ["split.json"]
    first, again, other = (run_split(tmp_path, seed, out) for seed, out in ((0, "a"), (0, "b"), (1, "c")))
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in names)
    assert (first / "train.csv").read_bytes() != (other / "train.csv").read_bytes()


def test_fractions_roughly_respected(tmp_path: Path) -> None:
    split = make_split(load_store_table(make_store(tmp_path, n_patients=200)), (0.55, 0.15, 0.30), seed=3)
    per_patient = split.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert per_patient["train"] == pytest.approx(0.55, abs=0.04)
    assert per_patient["val"] == pytest.approx(0.15, abs=0.04)
    assert per_patient["test"] == pytest.approx(0.30, abs=0.04)


@pytest.mark.parametrize("seed", range(8))
def test_rare_label_with_three_positive_patients_reaches_every_split(tmp_path: Path, seed: int) -> None:
    split = make_split(load_store_table(make_store(tmp_path, seed=seed)), (0.55, 0.15, 0.30), seed=seed)
    positive_patients = (
        split[split["EDH"].eq(1).fillna(False).astype(bool)].groupby("split")["patient_id"].nunique()
    )
    assert {s: int(positive_patients.get(s, 0)) for s in SPLITS} == {"train": 1, "val": 1, "test": 1}
    ich = split[split["ICH"].eq(1).fillna(False).astype(bool)].groupby("split")["patient_id"].nunique()
    assert all(ich.get(s, 0) >= 3 for s in SPLITS)


def test_files_have_seed_layout_relative_paths_and_empty_unknowns(tmp_path: Path, job_ctx) -> None:
    make_store(tmp_path)
    out = run_split(tmp_path)
    frames = {s: read_split(out, s) for s in SPLITS}
    assert list(frames["train"].columns) == ["img_path", "scan_id", "patient_id", "ICH", "EDH", "Tumor"]
    all_rows = pd.concat(frames.values())
    assert all(p.startswith("data/store/synth/volumes/") for p in all_rows["img_path"])
    unlabelled = all_rows[
        all_rows["scan_id"].str.endswith("0" * 12) & all_rows["patient_id"].str.endswith("05")
    ]
    assert len(unlabelled) and unlabelled[["ICH", "EDH", "Tumor"]].isna().all().all()
    text = (out / "train.csv").read_text().splitlines()
    assert any(line.endswith(",,,") for line in text), "unknown labels must be empty cells, not 0"
    meta = json.loads((out / "split.json").read_text())
    assert meta["store"] == "data/store/synth" and meta["seed"] == 0
    assert sum(meta["counts"][s]["scans"] for s in SPLITS) == len(all_rows)
    assert meta["counts"]["test"]["positives"]["EDH"] >= 1


def test_bad_label_value_and_missing_manifest_are_named_errors(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    labels = pd.read_csv(store / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[0, "ICH"] = "2"
    labels.to_csv(store / "labels.csv", index=False)
    with pytest.raises(InputError, match=r"labels\.csv.*'ICH'.*\['2'\]"):
        load_store_table(store)
    (store / "manifest.parquet").unlink()
    with pytest.raises(InputError, match=r"manifest\.parquet: file not found"):
        load_store_table(store)


def test_read_splits_refuses_a_patient_in_two_splits(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_patients=30)
    split = make_split(load_store_table(store), (0.5, 0.2, 0.3), seed=0)
    split.loc[0, "split"] = "test" if split.loc[0, "split"] != "test" else "train"
    split.loc[1, "patient_id"] = split.loc[0, "patient_id"]
    split.loc[1, "split"] = "val" if split.loc[0, "split"] != "val" else "train"
    write_split(split, tmp_path / "splits", store, tmp_path, 0, (0.5, 0.2, 0.3))
    with pytest.raises(InputError, match="patient-disjoint"):
        read_splits(tmp_path / "splits")
