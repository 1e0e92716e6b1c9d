"""RSNA 2019 Intracranial Hemorrhage `stage_2_train.csv`: labels per slice (SOP instance).

Rows `ID_<SOPInstanceUID>_<subtype>,<0|1>` under the header `ID,Label`, six subtypes per slice, mapped to the
canonical vocabulary below. An exam (series) is labelled by its slices (`base.join`, instance level): 1 when any
slice is 1, 0 when every slice is 0. The challenge's DICOM files carry SOPInstanceUIDs like `ID_0a1b2c3d4`, while
the rows name them `ID_0a1b2c3d4_epidural`: a leading `ID_` is dropped on both sides, so re-exported files with
numeric UIDs (`ID_1.2.840...._epidural`) match too.

The file (about 4.5 million rows) is read in chunks of two text columns (CHUNK_ROWS rows) and reduced per chunk
to one row of twelve counts per slice (its 0 and 1 rows per subtype), so memory grows with the number of slices,
not rows: 4.5 million rows (750,000 slices) peak at about 0.6 GB over the interpreter (benchmarks/discovery.py).
The same (slice, subtype) on several rows is counted (`label_rows_duplicated`); when those rows disagree the value
is unknown (`label_values_conflicting`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
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
_COUNT_COLUMNS = [f"{label}:{value}" for label in SUBTYPES.values() for value in "01"]
_POSITION = {subtype: i for i, subtype in enumerate(SUBTYPES)}
_PREFIX = "ID_"


def instance_key(uid: str) -> str:
    """A SOPInstanceUID (from a header or a row) in the form both sides share: no `ID_` prefix."""
    return str(uid).strip().removeprefix(_PREFIX)


def _reduce(path: Path, chunk: pd.DataFrame, first_row: int) -> pd.DataFrame:
    """One chunk -> one row per instance: for each label, the number of its 0 rows and of its 1 rows (uint32
    columns `<label>:0`, `<label>:1`). Bad rows are refused naming the file and data row."""
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
    # column of _COUNT_COLUMNS: 2 x the subtype's position + the value; one bincount over (instance, column)
    column = 2 * split[2].map(_POSITION).to_numpy(np.int64) + (value == "1").to_numpy(np.int64)
    instance, names = pd.factorize(head.str[len(_PREFIX):])
    width = len(_COUNT_COLUMNS)
    counts = np.bincount(instance * width + column, minlength=len(names) * width).reshape(-1, width)
    return pd.DataFrame(counts.astype(np.uint32), index=pd.Index(names, dtype=object), columns=_COUNT_COLUMNS)


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
    # a slice whose rows straddle two chunks appears in both partial results: add them up
    stats = parts[0] if len(parts) == 1 else pd.concat(parts).groupby(level=0, sort=False).sum()
    labels = [c for c in LABELS if c in SUBTYPES.values()]
    zeros = stats[[f"{c}:0" for c in labels]].to_numpy().astype(np.int64)
    ones = stats[[f"{c}:1" for c in labels]].to_numpy().astype(np.int64)
    given = zeros + ones
    conflicting = (zeros > 0) & (ones > 0)
    value = np.where(ones > 0, 1, 0)
    table = pd.DataFrame(value, index=pd.Index(stats.index, dtype=object, name=None), columns=labels).astype("Int64")
    table = table.mask((given == 0) | conflicting)
    present = [c for c, seen in zip(labels, given.any(axis=0), strict=True) if seen]
    table = table[present]
    counts = {"label_rows_duplicated": int(np.clip(given - 1, 0, None).sum()),
              "label_values_conflicting": int(conflicting.sum())}
    return LabelRows(path, "instance", table, normalise=instance_key, counts=counts)


class Rsna2019Source:
    name = "rsna2019"

    def read(self, cfg: IngestConfig) -> LabelRows:
        return read_rsna(labels_file(cfg, "stage_2_train.csv"))


SOURCE = Rsna2019Source()
