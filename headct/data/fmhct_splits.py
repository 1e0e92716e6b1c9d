"""FM-HCT's published split files -> headct split files over a store, matched through the local linkage file.

FM-HCT (the seed repository's `datasets/` folder, shared/REFERENCE.md section 4) publishes one CSV per split with
NIfTI paths of its own conversion, so its rows cannot name our volumes. They are matched by a source key the
linkage file (`private/linkage/<store>.csv`, written by ingest, never shared) holds beside the pseudonyms:

- CQ500 files (a `name` column, `CQ500-CT-<N>`): the patient key. CQ500 keys are compared without punctuation or
  case, so `CQ500-CT-0` (reads.csv) and `CQ500CT0` (the folder name, `ingest.patient_key: cq500_folder`) meet. Every
  accepted scan of that patient goes to the split (FM-HCT lists each series; the store keeps one per study).
- RSNA files (a `study_id` column, one row per exam): the exam's StudyInstanceUID; the exam's accepted scans go to
  the split.

The output has headct's split layout (train/val/test.csv: img_path, scan_id, patient_id, then the store's labels;
split.json) and holds pseudonyms only. What did not match is reported by count, never by key: FM-HCT rows with no
accepted scan in the store, store scans in no FM-HCT file, and patients FM-HCT put in more than one split (RSNA
splits exams, not patients); those patients are left out of every split, so the output stays patient-disjoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from headct.data.identity import read_linkage
from headct.data.splits import (
    ID_COLUMNS,
    SPLITS,
    label_columns,
    load_store_table,
    path_for_files,
    split_counts,
)
from headct.errors import InputError
from headct.io import atomic_path, write_json

KEY_COLUMNS = {"cq500": "name", "rsna": "study_id"}  # the FM-HCT column each kind is matched on
_LINKAGE_COLUMNS = ("scan_id", "patient_id", "patient_key", "study_uid")


def _norm(key: str) -> str:
    """CQ500 patient keys compared without punctuation or case (`CQ500-CT-0` == `CQ500CT0`)."""
    return re.sub(r"[^0-9A-Za-z]", "", key).upper()


def read_fmhct_file(path: Path) -> tuple[str, pd.DataFrame]:
    """(kind, rows) of one FM-HCT split CSV; InputError naming the file when it is unreadable or of no known kind."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None
    kinds = [kind for kind, column in KEY_COLUMNS.items() if column in frame.columns]
    if len(kinds) != 1 or "img_path" not in frame.columns:
        raise InputError(f"{path}: not an FM-HCT split file (needs img_path and one of {sorted(KEY_COLUMNS.values())}"
                         f"; found {list(frame.columns)})")
    return kinds[0], frame


def _linkage(path: Path, store_scans: pd.Series) -> pd.DataFrame:
    """The linkage rows of the store's accepted scans (other series of a study are in the file too)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: linkage file not found (ingest writes it under private/linkage/<store>.csv)")
    link = read_linkage(path)
    missing = [c for c in _LINKAGE_COLUMNS if c not in link.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; not a linkage file written by `headct ingest`")
    link = link[link["scan_id"].isin(store_scans)]
    if link.empty:
        raise InputError(f"{path}: none of the store's scans is in this linkage file; is it the store's?")
    return link


def match_rows(kind: str, frame: pd.DataFrame, link: pd.DataFrame) -> tuple[set[str], int]:
    """(store scan_ids the rows name, number of rows matching no accepted scan)."""
    if kind == "cq500":
        keys, rows = link["patient_key"].map(_norm), frame["name"].map(_norm)
    else:
        keys, rows = link["study_uid"].str.strip(), frame["study_id"].str.strip()
    by_key = link.groupby(keys.to_numpy())["scan_id"].apply(set).to_dict()
    matched = rows.map(lambda k: by_key.get(k, set()) if k else set())
    scans = set().union(*matched) if len(matched) else set()
    return scans, int((matched.map(len) == 0).sum())


def import_fmhct_splits(files: dict[str, Path], store: Path, linkage: Path, out: Path, root: Path) -> dict[str, Any]:
    """Write headct split files under `out` from FM-HCT's `files` ({"train": csv, "val": csv, "test": csv}) over
    `store`, matched through `linkage`; returns split.json's dict (counts only, no keys)."""
    if sorted(files) != sorted(SPLITS):
        raise InputError(f"FM-HCT split files: give one each for {list(SPLITS)}, got {sorted(files)}")
    table = load_store_table(store)
    link = _linkage(linkage, table["scan_id"])
    kinds, assigned, unmatched, rows = set(), {}, {}, {}
    for name in SPLITS:
        kind, frame = read_fmhct_file(files[name])
        kinds.add(kind)
        assigned[name], unmatched[name] = match_rows(kind, frame, link)
        rows[name] = len(frame)
    if len(kinds) > 1:
        raise InputError(f"FM-HCT split files mix kinds {sorted(kinds)}: {[str(f) for f in files.values()]}")
    table = table.assign(split=pd.NA)
    for name in SPLITS:
        table.loc[table["scan_id"].isin(assigned[name]), "split"] = name
    # a scan named by two files (one patient key in two splits), or a patient's scans spread over two splits
    both = set().union(*(assigned[s] & assigned[t] for i, s in enumerate(SPLITS) for t in SPLITS[i + 1:]))
    spread = table.dropna(subset=["split"]).groupby("patient_id")["split"].nunique()
    conflicted = set(spread[spread > 1].index) | set(table.loc[table["scan_id"].isin(both), "patient_id"])
    never = int(table["split"].isna().sum())
    table.loc[table["patient_id"].isin(conflicted), "split"] = pd.NA
    kept = table.dropna(subset=["split"])
    labels = label_columns(kept)
    files_out = kept.assign(img_path=[path_for_files(store / v, root) for v in kept["volume"]])
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with atomic_path(out / f"{name}.csv") as tmp:
            files_out.loc[files_out["split"] == name, [*ID_COLUMNS, *labels]].to_csv(tmp, index=False,
                                                                                      lineterminator="\n")
    (out / "pool.csv").unlink(missing_ok=True)
    summary = {
        "store": path_for_files(store, root), "seed": None, "source": f"fm-hct ({kinds.pop()})",
        "method": "FM-HCT's published split files, matched to the store through the local linkage file",
        "fmhct_rows": rows, "fmhct_rows_unmatched": unmatched,
        "patients_in_several_splits_left_out": len(conflicted),
        "store_scans_in_no_file": never,
        "labels": labels, "counts": split_counts(kept),
    }
    write_json(out / "split.json", summary)
    return summary
