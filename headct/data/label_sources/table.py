"""A generic labels table: a CSV with one key column and canonical label columns (1/0/empty = unknown).

`ingest.labels_key` says what the key column holds, `ingest.labels_key_column` its name (default: the same word):

    patient  the patient key ingest uses (`ingest.patient_key`: DICOM PatientID, or the CQ500-style folder name)
    study    StudyInstanceUID        series  SeriesInstanceUID
    path     a file or folder relative to SRC (`/` separators): a series takes the row of its own file (with or
             without the extension: NIfTI, Enhanced CT), else of its folder, else of the nearest folder above

Every other column must be a canonical label (`headct.config.LABELS`); anything else is refused naming the file
and the column, so a misspelt label never silently becomes "no label". Keys must be unique and non-empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from headct.data.label_sources.base import LabelRows, canonical_labels, labels_file, path_key, strip_key
from headct.errors import InputError

if TYPE_CHECKING:
    from headct.config.data import IngestConfig


class TableSource:
    name = "table"

    def read(self, cfg: IngestConfig) -> LabelRows:
        path = labels_file(cfg, "labels CSV")
        column = cfg.labels_key_column or cfg.labels_key
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        if column not in raw.columns:
            raise InputError(f"{path}: no key column {column!r} (ingest.labels_key_column; columns: "
                             f"{', '.join(map(str, raw.columns))})")
        normalise = path_key if cfg.labels_key == "path" else strip_key
        keys = raw[column].map(normalise)
        if (keys == "").any():
            raise InputError(f"{path}: key column {column!r} is empty on data row {int((keys == '').argmax()) + 1}")
        repeated = keys[keys.duplicated()]
        if len(repeated):
            raise InputError(f"{path}: {repeated.nunique()} key(s) of column {column!r} appear on more than one row")
        labels = canonical_labels(path, raw.drop(columns=[column]))
        if labels.columns.empty:
            raise InputError(f"{path}: no label column besides the key column {column!r}")
        labels.index = pd.Index(keys.to_numpy(), dtype=object, name=column)
        return LabelRows(path, cfg.labels_key, labels, normalise=normalise)


SOURCE = TableSource()
