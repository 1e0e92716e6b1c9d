"""The pre-training pool of `headct split` (split.labelled_train -> pool.csv) and absolute val/test counts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from headct.config.base import JobContext
from headct.config.data import SplitConfig
from headct.data.splits import SPLITS, load_store_table, make_split, read_pool, read_splits
from headct.errors import InputError
from pipelines import split as split_job
from tests.split_helpers import make_store


def split_with(root: Path, out: str, **kw) -> Path:
    cfg = SplitConfig(store=root / "data/store/synth", out=root / out, report_dir=root / "reports" / out, **kw)
    split_job.run(cfg, JobContext(root=root))
    return cfg.out


def patients_per_split(split: pd.DataFrame) -> dict[str, int]:
    return split.groupby("split")["patient_id"].nunique().to_dict()


def positive_share(frame: pd.DataFrame, label: str) -> float:
    per_patient = frame.groupby("patient_id")[label].max()
    return float(per_patient.eq(1).sum() / per_patient.notna().sum())


def test_pool_leaves_val_and_test_untouched_and_takes_the_rest_of_train(tmp_path: Path, job_ctx) -> None:
    make_store(tmp_path, n_patients=200)
    plain = split_with(tmp_path, "plain")
    pooled = split_with(tmp_path, "pooled", labelled_train=30)
    # The pool is drawn from train only: val and test are the very same files, and train.csv + pool.csv hold
    # exactly the rows the split without a pool puts in train.csv.
    for name in ("val", "test"):
        assert (pooled / f"{name}.csv").read_bytes() == (plain / f"{name}.csv").read_bytes()
    frames = read_splits(pooled, with_pool=True)
    union = pd.concat([frames["train"], frames["pool"]]).sort_values("scan_id", ignore_index=True)
    before = read_splits(plain)["train"].sort_values("scan_id", ignore_index=True)
    pd.testing.assert_frame_equal(union, before)
    assert frames["train"]["patient_id"].nunique() == 30
    assert list(frames["pool"].columns) == list(frames["train"].columns)  # same layout, labels kept
    # Without labelled_train: no pool file, and split.json has no pool entries.
    assert not (plain / "pool.csv").exists() and set(read_splits(plain, with_pool=True)) == set(SPLITS)
    plain_meta, pooled_meta = (json.loads((d / "split.json").read_text()) for d in (plain, pooled))
    assert "pool" not in plain_meta and "labelled_train" not in plain_meta and "pool" not in plain_meta["counts"]
    assert pooled_meta["labelled_train"] == 30
    assert pooled_meta["pool"]["patients"] == frames["pool"]["patient_id"].nunique() == 200 - sum(
        plain_meta["counts"][s]["patients"] for s in ("val", "test")) - 30
    assert pooled_meta["pool"]["scans"] == len(frames["pool"]) == pooled_meta["counts"]["pool"]["scans"]


def test_counts_are_exact_and_the_labelled_patients_are_stratified(tmp_path: Path) -> None:
    table = load_store_table(make_store(tmp_path, n_patients=300, seed=1))
    for seed in range(4):
        split = make_split(table, (0.55, 0.15, 0.30), seed, counts={"val": 40, "test": 60}, labelled_train=40)
        assert patients_per_split(split) == {"train": 40, "val": 40, "test": 60, "pool": 160}
        # Stratified: ICH (about 30% of patients) within a few points in labelled train and in the pool, and the
        # rare EDH (3 patients: one per split) reaches labelled train rather than the pool.
        train, pool = split[split["split"] == "train"], split[split["split"] == "pool"]
        assert abs(positive_share(train, "ICH") - positive_share(pool, "ICH")) < 0.05
        assert train["EDH"].eq(1).any() and not pool["EDH"].eq(1).any()
    assert not make_split(table, (0.55, 0.15, 0.30), 0, labelled_train=40).equals(
        make_split(table, (0.55, 0.15, 0.30), 1, labelled_train=40))


def test_a_pool_patient_in_val_or_test_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path, n_patients=60)
    out = split_with(tmp_path, "s", labelled_train=10)
    pool = (out / "pool.csv").read_text()
    test_row = (out / "test.csv").read_text().splitlines()[1]
    (out / "pool.csv").write_text(pool + test_row + "\n")
    for read in (read_splits, read_pool):
        with pytest.raises(InputError, match=r"in both test\.csv and pool\.csv; the pre-training pool must not"):
            read(out)


def test_a_split_without_a_pool_removes_a_stale_pool_file_and_read_pool_says_why(tmp_path: Path) -> None:
    make_store(tmp_path, n_patients=60)
    split_with(tmp_path, "s", labelled_train=10)
    out = split_with(tmp_path, "s")
    assert not (out / "pool.csv").exists()
    with pytest.raises(InputError, match=r"pool\.csv: file not found.*split\.labelled_train"):
        read_pool(out)


def test_bad_pool_settings_are_clear_errors(tmp_path: Path) -> None:
    table = load_store_table(make_store(tmp_path, n_patients=40))
    with pytest.raises(InputError, match="labelled_train=500 is more than the .* train patients"):
        make_split(table, (0.5, 0.25, 0.25), 0, labelled_train=500)
    with pytest.raises(InputError, match="30 val \\+ 20 test patients; the store has 40"):
        make_split(table, (0.5, 0.25, 0.25), 0, counts={"val": 30, "test": 20})
    with pytest.raises(ValidationError, match="either fractions or counts"):
        SplitConfig(fractions=(0.5, 0.25, 0.25), counts={"val": 1, "test": 1})
    with pytest.raises(ValidationError, match="counts needs val and test"):
        SplitConfig(counts={"val": 10})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SplitConfig(labelled_train=0)
