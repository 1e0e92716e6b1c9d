"""The label-source protocol and the one join from label keys to the store's accepted scans.

A source's `read(cfg)` returns `LabelRows`: a frame indexed by key (unique, non-empty strings) with one nullable
Int64 column per canonical label it knows (1/0, NA = unknown, in `LABELS` order), the level its keys live at and
the function that puts a store-side key into the same form as its index. The keys of one accepted scan at each
level (`ScanKeys`) come from its headers and files; they never leave ingest (UIDs and paths are not written):

    patient   the patient key ingest pseudonymises (DICOM PatientID, the CQ500-style folder name or the NIfTI's)
    study     StudyInstanceUID (a NIfTI: `nifti:<path under SRC without extension>`)
    series    SeriesInstanceUID (likewise)
    instance  every SOPInstanceUID of the series' slices: per label 1 when any slice is 1, 0 when every slice
              is 0 (a slice without a row, or an unknown value, leaves a 0 unproven: unknown), else unknown
    path      the series' file (one-file series: NIfTI, Enhanced CT), that file without its extension, then its
              folder and each folder above it, relative to SRC with `/`: the nearest one with a row wins
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np
import pandas as pd

from headct.config.base import LABELS
from headct.errors import InputError

if TYPE_CHECKING:
    from headct.config.data import IngestConfig
    from headct.data.series import Series, SliceHeader

Level = Literal["patient", "study", "series", "instance", "path"]
LEVELS: tuple[str, ...] = get_args(Level)
_EXTENSIONS = (".nii.gz", ".nii", ".dcm")  # dropped for the extension-less path key


def strip_key(key: str) -> str:
    return str(key).strip()


def path_key(path: str) -> str:
    """A path under SRC in one form: `/` separators, no `./` prefix, no trailing `/`."""
    text = str(path).strip().replace("\\", "/")
    return str(PurePosixPath(text)) if text else ""


@dataclass(frozen=True)
class LabelRows:
    """What a source read (see the module docstring); `counts` are its reading facts for the summary."""

    path: Path  # the labels file, for messages (never written)
    level: Level
    table: pd.DataFrame
    normalise: Callable[[str], str] = strip_key
    counts: dict[str, int] = field(default_factory=dict)


class LabelSource(Protocol):
    """One labels format: `name` is its `ingest.labels_format`; `read` raises InputError naming the file."""

    name: str

    def read(self, cfg: IngestConfig) -> LabelRows: ...


@dataclass(frozen=True)
class ScanKeys:
    """The source keys of one accepted scan at every level (built inside ingest; never written)."""

    scan_id: str
    patient_id: str
    patient: str | None
    study: str
    series: str
    instances: tuple[str, ...]  # unique SOPInstanceUIDs; "" stands for slices without one
    paths: tuple[str, ...]  # nearest first

    def at(self, level: str) -> tuple[str, ...]:
        if level == "patient":
            return (self.patient,) if self.patient else ()
        if level == "instance":
            return self.instances
        if level == "path":
            return self.paths
        return (self.study,) if level == "study" else (self.series,)


def scan_keys(scan_id: str, patient_id: str, patient_key: str | None, series: Series, src: Path) -> ScanKeys:
    """The keys of one scan from its series (its slice headers and files) and the patient key ingest chose."""
    files = [s.path for s in series.slices]
    paths: list[str] = []
    if len(set(files)) == 1:  # the series is one file: it can be named itself
        relative = path_key(os.path.relpath(files[0], src))
        paths.append(relative)
        for ext in _EXTENSIONS:
            if relative.lower().endswith(ext):
                paths.append(relative[: -len(ext)])
                break
    folder = PurePosixPath(path_key(os.path.relpath(os.path.commonpath([f.parent for f in files]), src)))
    paths += [str(p) for p in (folder, *folder.parents) if str(p) not in (".", "") and not str(p).startswith("..")]
    instances = tuple(dict.fromkeys(s.sop_instance_uid for s in series.slices))
    return ScanKeys(scan_id, patient_id, patient_key, series.study_uid, series.series_uid, instances, tuple(paths))


def labels_file(cfg: IngestConfig, what: str) -> Path:
    """`ingest.labels`, which must exist; `what` names the file the source expects (for the messages)."""
    if cfg.labels is None:
        raise InputError(f"ingest.labels_format={cfg.labels_format} needs ingest.labels (the {what} path)")
    return require_file(cfg.labels)


def require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise InputError(f"labels file {path} not found (ingest.labels; set ingest.labels_format=none for "
                         "unlabelled data)")
    return Path(path)


def canonical_labels(path: Path, raw: pd.DataFrame) -> pd.DataFrame:
    """Canonical label columns from text columns of 0/1/empty (`1.0` and surrounding spaces accepted) -> Int64
    in `LABELS` order. A column that is not a canonical label, or another value, is refused naming the file."""
    for column in raw.columns:
        if column not in LABELS:
            hint = difflib.get_close_matches(str(column), LABELS, n=1)
            raise InputError(f"{path}: column {column!r} is not a canonical label"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; allowed: {', '.join(LABELS)}")
    out = {}
    for label in [c for c in LABELS if c in raw.columns]:
        text = raw[label].astype("string").str.strip().replace("", pd.NA)
        values = pd.to_numeric(text, errors="coerce")
        bad = (values.isna() & text.notna()) | ~(values.isin([0, 1]) | values.isna())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
            raise InputError(f"{path}: column {label!r} must hold 0, 1 or nothing (data row {row}: "
                             f"{text[bad].iloc[0]!r})")
        out[label] = values.astype("Int64").to_numpy()
    return pd.DataFrame(out, index=raw.index, dtype="Int64")


def check_rows(rows: LabelRows, name: str) -> LabelRows:
    """A source's output checked against the protocol (a plugin's mistake named here, not deep in the join)."""
    table = rows.table
    problems = []
    if rows.level not in LEVELS:
        problems.append(f"level {rows.level!r} is not one of {', '.join(LEVELS)}")
    if not table.index.is_unique:
        problems.append("its keys are not unique")
    if any(not isinstance(k, str) or not k for k in table.index):
        problems.append("every key must be a non-empty string")
    if table.columns.empty:
        problems.append("no canonical label column")
    elif list(table.columns) != [c for c in LABELS if c in table.columns]:
        problems.append(f"columns must be canonical labels in LABELS order, got {list(table.columns)}")
    elif any(str(t) != "Int64" for t in table.dtypes) or not table.isin([0, 1]).where(table.notna(), True).all(axis=None):
        problems.append("values must be Int64 0/1/NA")
    if problems:
        raise InputError(f"{rows.path}: label source {name!r} returned bad rows: " + "; ".join(problems))
    return rows


@dataclass(frozen=True)
class Seen:
    """What discovery met, to tell why a label key reached no accepted scan (built inside ingest, never written):
    the study, series and SOP instance keys of every header read, and the names of the files that could not be
    read, without their extension (RSNA names each file after its SOP instance: `ID_<hex>.dcm`)."""

    studies: frozenset[str] = frozenset()
    series: frozenset[str] = frozenset()
    instances: frozenset[str] = frozenset()
    unreadable: frozenset[str] = frozenset()

    @classmethod
    def of(cls, headers: list[SliceHeader], bad_files: list[tuple[Path, str]]) -> Seen:
        names = set()
        for path, _ in bad_files:
            name = path.name
            for ext in _EXTENSIONS:
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            names.add(name)
        return cls(frozenset(h.study_uid for h in headers), frozenset(h.series_uid for h in headers),
                   frozenset(h.sop_instance_uid for h in headers if h.sop_instance_uid), frozenset(names))

    def keys(self, level: str) -> tuple[frozenset[str], frozenset[str]] | None:
        """(keys read, names of unreadable files) at `level`, or None where discovery cannot tell (patient, path)."""
        found = {"study": self.studies, "series": self.series, "instance": self.instances}.get(level)
        return None if found is None else (found, self.unreadable if level == "instance" else frozenset())


def join(rows: LabelRows | None, scans: list[ScanKeys], seen: Seen | None = None
         ) -> tuple[pd.DataFrame, int, dict[str, int]]:
    """(labels.csv frame: scan_id, patient_id and the source's label columns; scans no row reached; counts).

    Counts: the source's own, `label_keys_unmatched` (keys no accepted scan carries: other patients, slices of
    rejected series or of files not in SRC), and for instance level `label_scans_partial` (scans with some but
    not all slices labelled). With `seen` (study, series and instance levels) the unmatched keys are split by
    why: `label_keys_series_not_accepted` (a file carrying the key was read, but its series was rejected or not
    selected: rejects.csv says why), `label_keys_file_unreadable` (the file named after the key could not be
    read), `label_keys_not_in_source` (no file of SRC carries it).
    """
    frame = pd.DataFrame({"scan_id": [s.scan_id for s in scans], "patient_id": [s.patient_id for s in scans]},
                         columns=["scan_id", "patient_id"])
    if rows is None:
        return frame, len(frame), {}
    table = rows.table
    position, rank, keys = [], [], []
    for i, scan in enumerate(scans):
        for r, key in enumerate(scan.at(rows.level)):
            position.append(i)
            rank.append(r)
            keys.append(rows.normalise(key))
    hit = pd.Index(keys, dtype=object).isin(table.index)
    found = table.reindex(pd.Index(keys, dtype=object))
    found.index = pd.RangeIndex(len(keys))
    found["_scan"], found["_rank"], found["_hit"] = position, rank, hit
    counts = dict(rows.counts)
    if rows.level == "instance":
        labels = _any_or_all(found, table.columns, len(scans))
        per_scan = found.groupby("_scan")["_hit"].agg(["sum", "size"]).reindex(range(len(scans)), fill_value=0)
        reached = per_scan["sum"] > 0
        counts["label_scans_partial"] = int((reached & (per_scan["sum"] < per_scan["size"])).sum())
    else:  # one key per scan, or nearest first (path): the first key with a row decides
        first = found[found["_hit"]].sort_values(["_scan", "_rank"], kind="stable").drop_duplicates("_scan")
        labels = first.set_index("_scan")[list(table.columns)].reindex(range(len(scans)))
        reached = pd.Series(np.isin(np.arange(len(scans)), first["_scan"].to_numpy()))
    unmatched = table.index[~table.index.isin(pd.Index(keys, dtype=object)[hit])]
    counts["label_keys_unmatched"] = len(unmatched)
    met = seen.keys(rows.level) if seen is not None else None
    if met is not None:
        read = unmatched.isin(pd.Index([rows.normalise(k) for k in met[0]], dtype=object))
        unreadable = ~read & unmatched.isin(pd.Index([rows.normalise(k) for k in met[1]], dtype=object))
        counts["label_keys_series_not_accepted"] = int(read.sum())
        counts["label_keys_file_unreadable"] = int(unreadable.sum())
        counts["label_keys_not_in_source"] = int((~read & ~unreadable).sum())
    labels.index = frame.index
    out = pd.concat([frame, labels.astype("Int64")], axis=1)
    return out, int((~reached.to_numpy()).sum()), counts


def _any_or_all(found: pd.DataFrame, columns: pd.Index, n_scans: int) -> pd.DataFrame:
    """Per scan and label: 1 if any of its slices is 1, 0 if every one is 0, else NA (unknown)."""
    scan = found["_scan"]
    out = {}
    for label in columns:
        any_one = (found[label] == 1).fillna(False).groupby(scan).any()
        all_zero = (found[label] == 0).fillna(False).groupby(scan).all()
        column = pd.Series(pd.NA, index=any_one.index, dtype="Int64")
        column[all_zero] = 0
        column[any_one] = 1
        out[label] = column
    return pd.DataFrame(out, columns=columns).reindex(range(n_scans)).astype("Int64")
