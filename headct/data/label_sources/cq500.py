"""CQ500 `reads.csv` (and the synthetic data set, which writes the same layout): labels per patient.

Columns `name, Category, R1:<L>, ..., R2:<L>, ..., R3:<L>, ...` (0/1). The label of a patient is the majority of
the readers who read it: positive when more than half said 1, negative when more than half said 0, unknown on a
tie or when nobody read it. `name` (`CQ500-CT-0`) matches the folder `CQ500CT0` once dashes are removed
(`patient_key_of_name`, applied to both sides of the join).
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

READERS = ("R1", "R2", "R3")


def patient_key_of_name(name: str) -> str:
    """CQ500 `name` or folder token -> the shared patient key (`CQ500-CT-0` and `CQ500CT0` -> `CQ500CT0`)."""
    return str(name).strip().replace("-", "")


def majority(reads: pd.DataFrame) -> pd.Series:
    """Row-wise majority of 0/1/NA reader columns -> nullable Int64 (NA on a tie or with no reads)."""
    positives = reads.sum(axis=1, skipna=True)
    counts = reads.notna().sum(axis=1)
    out = pd.Series(pd.NA, index=reads.index, dtype="Int64")
    out[positives * 2 > counts] = 1
    out[(positives * 2 < counts) & (counts > 0)] = 0
    return out


def read_cq500(path: Path) -> pd.DataFrame:
    """Majority labels per patient key from a CQ500-style reads.csv.

    Returns a frame indexed by patient key with one nullable Int64 column per canonical label present.
    Raises InputError naming the file for a missing file, a missing `name` column, a label without reader
    columns, values other than 0/1, or two rows with the same patient key.
    """
    table = pd.read_csv(require_file(path), dtype=str, keep_default_na=True)
    if "name" not in table.columns:
        raise InputError(f"{path}: no `name` column (CQ500 reads.csv layout expected)")
    keys = table["name"].map(patient_key_of_name)
    duplicated = keys[keys.duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: {len(duplicated)} patient key(s) appear on more than one row")
    labels = {}
    for label in LABELS:
        columns = [f"{reader}:{label}" for reader in READERS if f"{reader}:{label}" in table.columns]
        if not columns:
            continue
        reads = table[columns].apply(pd.to_numeric, errors="coerce")
        bad = reads.isna() & table[columns].notna()
        if bad.any().any() or not reads.isin([0, 1]).where(reads.notna(), True).all().all():
            raise InputError(f"{path}: columns {', '.join(columns)} must hold 0, 1 or nothing")
        labels[label] = majority(reads).to_numpy()
    if not labels:
        raise InputError(f"{path}: no reader columns like `R1:ICH` for any canonical label")
    return pd.DataFrame(labels, index=pd.Index(keys, name="patient_key")).astype("Int64")


class Cq500Source:
    name = "cq500"

    def read(self, cfg: IngestConfig) -> LabelRows:
        path = labels_file(cfg, "reads.csv")
        return LabelRows(path, "patient", read_cq500(path), normalise=patient_key_of_name)


SOURCE = Cq500Source()
