"""RSNA 2019 Intracranial Hemorrhage `stage_2_train.csv`: labels per slice (SOP instance).

Rows `ID_<SOPInstanceUID>_<subtype>,<0|1>` under the header `ID,Label`, six subtypes per slice, mapped to the
canonical vocabulary below. An exam (series) is labelled by its slices (`base.join`, instance level): 1 when any
slice is 1, 0 when every slice is 0. The challenge's DICOM files carry SOPInstanceUIDs like `ID_0a1b2c3d4`, while
the rows name them `ID_0a1b2c3d4_epidural`: a leading `ID_` is dropped on both sides, so re-exported files with
numeric UIDs (`ID_1.2.840...._epidural`) match too.

The file (about 4.5 million rows) is read in chunks of two text columns and reduced per chunk, so memory grows
with the number of distinct (slice, subtype) pairs, not rows. The same (slice, subtype) on several rows is
counted (`label_rows_duplicated`); when those rows disagree the value is unknown (`label_values_conflicting`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from headct.config.base import LABELS
from headct.data.label_sources.base import LabelRows, labels_file, require_file
from headct.errors import InputError

if TYPE_CHECKING:
    from headct.config.data import IngestConfig

SUBTYPES: dict[str, str] = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "any": "ICH",
}
CHUNK_ROWS = 500_000
_PREFIX = "ID_"


def instance_key(uid: str) -> str:
    """A SOPInstanceUID (from a header or a row) in the form both sides share: no `ID_` prefix."""
    return str(uid).strip().removeprefix(_PREFIX)


def _reduce(path: Path, chunk: pd.DataFrame, first_row: int) -> pd.DataFrame:
    """One chunk -> per (instance, label): rows, min, max. Bad rows are refused naming the file and data row."""
    split = chunk["ID"].str.strip().str.rpartition("_")  # columns: before the last "_", "_", the subtype
    head, label = split[0], split[2].map(SUBTYPES)
    bad = ~head.str.startswith(_PREFIX) | (head.str.len() <= len(_PREFIX)) | label.isna()
    if bad.any():
        row = first_row + int(bad.to_numpy().argmax()) + 1
        raise InputError(f"{path}: data row {row}: ID {chunk['ID'][bad].iloc[0]!r} is not "
                         f"ID_<SOPInstanceUID>_<subtype> with a subtype in {', '.join(SUBTYPES)}")
    value = chunk["Label"].str.strip()
    bad = ~value.isin(["0", "1"])
    if bad.any():
        row = first_row + int(bad.to_numpy().argmax()) + 1
        raise InputError(f"{path}: data row {row}: Label must be 0 or 1, got {chunk['Label'][bad].iloc[0]!r}")
    frame = pd.DataFrame({"instance": head.str[len(_PREFIX):], "label": label, "value": value.astype("int8")})
    return frame.groupby(["instance", "label"], sort=False)["value"].agg(["size", "min", "max"])


def read_rsna(path: Path, chunk_rows: int = CHUNK_ROWS) -> LabelRows:
    """Instance-level rows of a stage_2_train.csv (module docstring)."""
    try:
        reader = pd.read_csv(require_file(path), usecols=["ID", "Label"], dtype=str, keep_default_na=False,
                             chunksize=chunk_rows)
    except ValueError as exc:  # a missing column is reported when the header is parsed
        raise InputError(f"{path}: expected the columns ID, Label of RSNA 2019 stage_2_train.csv ({exc})") from None
    parts, rows = [], 0
    with reader:
        for chunk in reader:
            parts.append(_reduce(path, chunk, rows))
            rows += len(chunk)
    if not rows:
        raise InputError(f"{path}: no rows")
    # a slice whose rows straddle two chunks appears in both partial results: combine them
    stats = pd.concat(parts).groupby(level=["instance", "label"], sort=False).agg(
        {"size": "sum", "min": "min", "max": "max"})
    conflicting = stats["min"] != stats["max"]
    value = stats["max"].astype("Int64").mask(conflicting)
    table = value.unstack("label")
    table = table[[c for c in LABELS if c in table.columns]].astype("Int64")
    table.columns.name = None
    counts = {"label_rows_duplicated": int((stats["size"] - 1).sum()),
              "label_values_conflicting": int(conflicting.sum())}
    return LabelRows(path, "instance", table, normalise=instance_key, counts=counts)


class Rsna2019Source:
    name = "rsna2019"

    def read(self, cfg: IngestConfig) -> LabelRows:
        return read_rsna(labels_file(cfg, "stage_2_train.csv"))


SOURCE = Rsna2019Source()
