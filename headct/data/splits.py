"""Patient-disjoint, label-stratified, seeded train/val/test splits and their CSV files.

A split file (`train.csv`, `val.csv`, `test.csv`) has the seed's layout: `img_path` (the scan's int16 `.npy`,
relative to the project root), `scan_id`, `patient_id`, then one column per label with 1/0, empty = unknown.
`split.json` beside them records the store, seed, fractions and counts. Whole patients go to one split, so no
patient's scans can leak from training into evaluation.

The pre-training pool (`split.labelled_train`): only that many train patients keep their labels in train.csv,
drawn seeded and stratified like the split itself; the other train patients go to `pool.csv` (same columns,
labels kept for the supervised ceiling only: pre-training reads its scans, never its labels, and no other
labelled-data job reads it). The pool is patient-disjoint from every split file, checked wherever they are read.

Stratification is iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML 2011) over patient label
vectors (a patient is positive for a label when any of their scans is), over both classes of each label
(positive and known-negative patients), with one change: while a class's patients are dealt, a split that has
none of that class yet is served first, so a label with >= 3 positive patients has positives in train, val
and test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headct.config.base import LABELS
from headct.errors import InputError
from headct.io import atomic_path, write_json

SPLITS: tuple[str, ...] = ("train", "val", "test")
POOL = "pool"  # pool.csv: train patients without labels for the evaluations (split.labelled_train)
POOL_STREAM = 11  # numpy stream of the split seed that draws the labelled train patients
ID_COLUMNS: tuple[str, ...] = ("img_path", "scan_id", "patient_id")
_TRUE = {"1", "1.0", "true", "True"}
_FALSE = {"0", "0.0", "false", "False"}


# ----------------------------------------------------------------------------------------------- reading
def parse_label_column(raw: pd.Series, source: Path, column: str) -> pd.Series:
    """Strings '1'/'0'/'' -> nullable Int8 (NA = unknown). Anything else is an InputError naming file and column."""
    text = raw.astype(str).str.strip()
    bad = ~(text.isin(_TRUE) | text.isin(_FALSE) | (text == ""))
    if bad.any():
        examples = sorted(set(text[bad]))[:3]
        raise InputError(f"{source}: column {column!r} must hold 1, 0 or empty (unknown); found {examples}")
    out = pd.Series(pd.NA, index=raw.index, dtype="Int8")
    out[text.isin(_TRUE)] = 1
    out[text.isin(_FALSE)] = 0
    return out


def label_columns(frame: pd.DataFrame) -> list[str]:
    """The canonical label columns present in `frame`, in vocabulary order."""
    return [label for label in LABELS if label in frame.columns]


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame["scan_id"].duplicated().any():
        dup = frame.loc[frame["scan_id"].duplicated(), "scan_id"].iloc[0]
        raise InputError(f"{path}: scan_id {dup!r} appears more than once")
    return frame


def load_store_table(store: Path) -> pd.DataFrame:
    """One row per stored scan: scan_id, patient_id, volume (relative to `store`), then label columns.

    Reads `manifest.parquet` and `labels.csv` written by ingest. Label columns are nullable Int8 (NA = unknown);
    a scan without a labels row keeps all labels unknown (it still belongs in a split, for pre-training).
    """
    manifest_path, labels_path = store / "manifest.parquet", store / "labels.csv"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: file not found (run `headct ingest` first)")
    try:
        manifest = pd.read_parquet(manifest_path, columns=["scan_id", "patient_id", "volume"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{manifest_path}: cannot read scan_id, patient_id, volume ({exc})") from exc
    manifest = manifest.astype(str)
    duplicated = manifest["scan_id"].duplicated()
    if duplicated.any():
        raise InputError(
            f"{manifest_path}: scan_id {manifest['scan_id'][duplicated].iloc[0]!r} appears more than once"
        )
    labels = _read_csv(labels_path, ["scan_id", "patient_id"])
    unknown = [c for c in labels.columns if c not in ("scan_id", "patient_id") and c not in LABELS]
    if unknown:
        raise InputError(f"{labels_path}: unknown label column(s) {unknown}; allowed: {', '.join(LABELS)}")
    stray = ~labels["scan_id"].isin(manifest["scan_id"])
    if stray.any():
        raise InputError(
            f"{labels_path}: {int(stray.sum())} scan_id(s) not in {manifest_path.name} "
            f"(e.g. {labels['scan_id'][stray].iloc[0]!r}); the store is inconsistent, re-run ingest"
        )
    names = label_columns(labels)
    for name in names:
        labels[name] = parse_label_column(labels[name], labels_path, name)
    table = manifest.merge(labels, on="scan_id", how="left", suffixes=("", "_labels"))
    clash = table["patient_id_labels"].notna() & (table["patient_id_labels"] != table["patient_id"])
    if clash.any():
        scan = table["scan_id"][clash].iloc[0]
        raise InputError(f"{labels_path}: patient_id differs from {manifest_path.name} for scan {scan!r}")
    table = table.drop(columns="patient_id_labels")
    for name in names:
        table[name] = table[name].astype("Int8")
    return table.sort_values(["patient_id", "scan_id"], ignore_index=True)


def read_split(split_dir: Path, name: str) -> pd.DataFrame:
    """Read one split file: img_path, scan_id, patient_id (str) and label columns (Int8, NA = unknown).
    `name` is one of SPLITS or POOL (use `read_pool`, which also checks the pool against the splits)."""
    if name not in (*SPLITS, POOL):
        raise ValueError(f"split name must be one of {(*SPLITS, POOL)}, got {name!r}")
    path = Path(split_dir) / f"{name}.csv"
    frame = _read_csv(path, ID_COLUMNS)
    for label in label_columns(frame):
        frame[label] = parse_label_column(frame[label], path, label)
    return frame


def has_pool(split_dir: Path) -> bool:
    return (Path(split_dir) / f"{POOL}.csv").is_file()


def _check_disjoint(split_dir: Path, frames: dict[str, pd.DataFrame]) -> None:
    seen: dict[str, str] = {}
    for name, frame in frames.items():
        for patient in frame["patient_id"].unique():
            if patient in seen:
                why = ("the pre-training pool must not hold a patient of any split file" if POOL in (seen[patient], name)
                       else "splits must be patient-disjoint")
                raise InputError(f"{split_dir}: patient {patient!r} is in both {seen[patient]}.csv and {name}.csv; {why}")
            seen[patient] = name


def read_splits(split_dir: Path, with_pool: bool = False) -> dict[str, pd.DataFrame]:
    """The three split files, checked to be patient-disjoint (a shared patient would leak into evaluation), and
    from pool.csv where there is one (also checked). `with_pool`: include it as frames["pool"] (when present)."""
    frames = {name: read_split(split_dir, name) for name in SPLITS}
    pool = read_split(split_dir, POOL) if has_pool(split_dir) else None
    _check_disjoint(split_dir, {**frames, **({POOL: pool} if pool is not None else {})})
    if with_pool and pool is not None:
        frames[POOL] = pool
    return frames


def read_pool(split_dir: Path) -> pd.DataFrame:
    """pool.csv, checked patient-disjoint from train, val and test; InputError naming the file when absent."""
    if not has_pool(split_dir):
        raise InputError(f"{Path(split_dir) / 'pool.csv'}: file not found (the split has no pre-training pool: "
                         "set split.labelled_train and re-run `headct split`)")
    return read_splits(split_dir, with_pool=True)[POOL]


# -------------------------------------------------------------------------------------------- assignment
def patient_classes(table: pd.DataFrame, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient ids (sorted) and two (P, L) bool matrices: positive (any scan positive for the label) and
    negative (no scan positive, at least one known negative). Unknown-only patients are neither."""
    patients = np.sort(table["patient_id"].unique())
    values = table[list(labels)]

    def any_scan(mask: pd.DataFrame) -> np.ndarray:
        grouped = mask.fillna(False).astype(bool).groupby(table["patient_id"]).any()
        return grouped.reindex(patients).to_numpy(dtype=bool).reshape(len(patients), len(labels))

    positive = any_scan(values.eq(1))
    return patients, positive, any_scan(values.eq(0)) & ~positive


def assign_patients(positives: np.ndarray, fractions: Sequence[float], seed: int | Sequence[int],
                    sizes: Sequence[int] | None = None, served_first: Sequence[bool] | None = None) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per patient, by seeded iterative stratification.

    Args:
        positives: (P, K) bool, patient is a member of stratification class k (e.g. positive for a label).
        fractions: desired share of patients per split (sum 1); unused when `sizes` is given.
        seed: the only source of randomness (processing order and ties); an int or numpy seed sequence.
        sizes: exact patients per split (sum P), a hard limit: a full split takes no more patients.
        served_first: which splits get a class's first patient while they have none of it (default: every one).
    Returns:
        (P,) int array.
    """
    rng = np.random.default_rng(seed)
    n_patients, n_labels = positives.shape
    if sizes is not None and (sum(sizes) != n_patients or min(sizes) < 0):
        raise ValueError(f"sizes {list(sizes)} must be >= 0 and sum to the {n_patients} patients")
    frac = np.asarray(fractions if sizes is None else np.asarray(sizes) / n_patients, dtype=float)
    want_total = frac * n_patients if sizes is None else np.asarray(sizes, dtype=float)  # patients still wanted
    want_label = frac[:, None] * positives.sum(axis=0)[None, :]  # (3, L) positive patients still wanted
    have_label = np.zeros((len(frac), n_labels), dtype=int)
    first = np.ones(len(frac), dtype=bool) if served_first is None else np.asarray(served_first, dtype=bool)
    split = np.full(n_patients, -1, dtype=int)
    order = rng.permutation(n_patients)

    def take(patient: int, split_index: int) -> None:
        split[patient] = split_index
        want_total[split_index] -= 1
        want_label[split_index] -= positives[patient]
        have_label[split_index] += positives[patient]

    while True:
        open_positive = positives & (split == -1)[:, None]
        remaining = open_positive.sum(axis=0)
        if not remaining.any():
            break
        # The rarest label first: its few positives have the least freedom.
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(int).max)))
        for patient in order[open_positive[order, label]]:
            # Highest priority last in lexsort: empty split for this label, then label need, then size need.
            keys = (rng.random(len(frac)), want_total, want_label[:, label], (have_label[:, label] == 0) & first)
            take(patient, int(np.lexsort(keys if sizes is None else (*keys, want_total > 0.5))[-1]))
    for patient in order[split[order] == -1]:
        take(patient, int(np.lexsort((rng.random(len(frac)), want_total))[-1]))
    return split


def make_split(table: pd.DataFrame, fractions: Sequence[float], seed: int, counts: dict[str, int] | None = None,
               labelled_train: int | None = None) -> pd.DataFrame:
    """`table` (from load_store_table) plus a `split` column (train, val, test, and pool with `labelled_train`);
    rows sorted by patient_id, scan_id. `counts`: exact val and test patients instead of `fractions`."""
    if table.empty:
        raise InputError("the store holds no scans to split")
    patients, positive, negative = patient_classes(table, label_columns(table))
    if len(patients) < len(SPLITS):
        raise InputError(f"need at least {len(SPLITS)} patients to split, the store has {len(patients)}")
    # Both classes of every label are stratified: with a common label (ICH in about half of the patients) a
    # small val split needs its negatives as much as its positives.
    classes = np.concatenate([positive, negative], axis=1)
    sizes = None
    if counts is not None:
        sizes = [len(patients) - counts["val"] - counts["test"], counts["val"], counts["test"]]
        if sizes[0] < 1:
            raise InputError(f"split.counts asks for {counts['val']} val + {counts['test']} test patients; the store "
                             f"has {len(patients)}, leaving none for train")
    index = assign_patients(classes, fractions, seed, sizes)
    if labelled_train is not None:
        index = _draw_pool(classes, index, labelled_train, seed)
    by_patient = dict(zip(patients, np.asarray((*SPLITS, POOL))[index], strict=True))
    out = table.copy()
    out["split"] = out["patient_id"].map(by_patient)
    return out.sort_values(["patient_id", "scan_id"], ignore_index=True)


def _draw_pool(classes: np.ndarray, index: np.ndarray, labelled: int, seed: int) -> np.ndarray:
    """`labelled` of the train patients (index 0) stay train, stratified like the split (own seed stream); the
    rest become pool (index 3). Only the labelled set is served first: a class with any train patient has one in
    labelled train (the pool's labels are read by the ceiling alone, so a rare label is better kept labelled)."""
    train = np.flatnonzero(index == 0)
    if labelled > len(train):
        raise InputError(f"split.labelled_train={labelled} is more than the {len(train)} train patients")
    keep = assign_patients(classes[train], (), [seed, POOL_STREAM], sizes=[labelled, len(train) - labelled],
                           served_first=[True, False])
    out = index.copy()
    out[train[keep == 1]] = 3
    return out


# ------------------------------------------------------------------------------------------------ writing
def path_for_files(path: Path, root: Path) -> str:
    """POSIX path relative to `root` when inside it (portable split files), else absolute."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def store_of_split(split_dir: Path, root: Path) -> Path | None:
    """The store a split was made from (split.json's `store`, relative to `root` unless absolute), or None when
    the split folder has no split.json (splits brought in from elsewhere). An unusable split.json is an error."""
    split_json = Path(split_dir) / "split.json"
    if not split_json.is_file():
        return None
    try:
        store = Path(json.loads(split_json.read_text())["store"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{split_json}: no usable 'store' entry ({exc!r})") from None
    return store if store.is_absolute() else Path(root) / store


def split_counts(split: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per split (and the pool, when there is one): patients, scans, and per label positive/negative scans and
    positive patients."""
    labels = label_columns(split)
    counts: dict[str, dict[str, Any]] = {}
    for name in (*SPLITS, POOL) if split["split"].eq(POOL).any() else SPLITS:
        part = split[split["split"] == name]
        counts[name] = {
            "patients": int(part["patient_id"].nunique()),
            "scans": len(part),
            "positives": {lab: int(part[lab].eq(1).sum()) for lab in labels},
            "negatives": {lab: int(part[lab].eq(0).sum()) for lab in labels},
            "positive_patients": {
                lab: int(part.loc[part[lab].eq(1).fillna(False).astype(bool), "patient_id"].nunique())
                for lab in labels
            },
        }
    return counts


def write_split(
    split: pd.DataFrame, out: Path, store: Path, root: Path, seed: int, fractions: Sequence[float],
    counts: dict[str, int] | None = None, labelled_train: int | None = None,
) -> dict[str, Any]:
    """Write train/val/test.csv (+ pool.csv with `labelled_train`) and split.json under `out` (each file
    atomically; a pool.csv left from an earlier split without a pool is removed). Returns the split.json dict."""
    labels = label_columns(split)
    files = split.copy()
    files["img_path"] = [path_for_files(store / v, root) for v in files["volume"]]
    names = (*SPLITS, POOL) if labelled_train is not None else SPLITS
    for name in names:
        part = files.loc[files["split"] == name, [*ID_COLUMNS, *labels]]
        with atomic_path(out / f"{name}.csv") as tmp:
            part.to_csv(tmp, index=False, lineterminator="\n")
    if labelled_train is None:
        (out / f"{POOL}.csv").unlink(missing_ok=True)
    summary: dict[str, Any] = {"store": path_for_files(store, root), "seed": seed}
    if counts is None:
        summary["fractions"] = dict(zip(SPLITS, fractions, strict=True))
    else:
        summary["patients_requested"] = {"train": int(split.loc[split["split"].isin(("train", POOL)),
                                                                "patient_id"].nunique()), **counts}
    summary["method"] = "iterative stratification over patient label vectors, empty splits served first"
    if labelled_train is not None:
        summary["labelled_train"] = labelled_train
        summary["pool"] = {
            "file": f"{POOL}.csv", "patients": int(files.loc[files["split"] == POOL, "patient_id"].nunique()),
            "scans": int(files["split"].eq(POOL).sum()),
            "method": "labelled train patients drawn by the same stratification (seed stream "
                      f"{POOL_STREAM}); the rest of train is the pool",
            "labels": "kept in the file for the supervised ceiling only (finetune.train_splits); pre-training "
                      "reads its scans, never its labels",
        }
    summary["labels"] = labels
    summary["counts"] = split_counts(split)
    write_json(out / "split.json", summary)
    return summary
