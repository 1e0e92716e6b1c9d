"""Label sources: one registry, one protocol, one join (`ingest.labels_format` names a registered source).

A label source reads a labels file into rows keyed at one declared level (patient, study, series, instance or
path) holding canonical labels (`headct.config.LABELS`, 1/0, unknown = NA, never 0); `join` then maps those keys
to the store's accepted scans the same way for every source (`base.py`). Ingest calls `load` before any work
(a bad labels file fails first) and `join` at the end, and knows no source by name.

Built-in sources, one module each: `cq500` (reads.csv, majority of R1-R3, per patient), `rsna2019`
(stage_2_train.csv, per slice; exam = max over its slices), `table` (a CSV with one key column and canonical label
columns). Another source is one module with an object satisfying `base.LabelSource`, passed to `register`.

This module imports nothing heavy (pandas is imported with a source). An unknown `labels_format` is a
`ConfigError` (exit 2, like any invalid parameter), raised by `load` before ingest does any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from headct.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from headct.config.data import IngestConfig
    from headct.data.discovery import Discovery
    from headct.data.label_sources.base import LabelRows, LabelSource, ScanKeys

NONE = "none"  # labels_format for unlabelled data: no source at all
ISSUES = "label_issues.csv"  # in the store (or shard folder) beside labels.csv: label-side problems, counts only
_BUILTIN = ("cq500", "rsna2019", "table")  # modules of this package, each holding `SOURCE`; imported on first use
_registered: dict[str, LabelSource] = {}


def names() -> tuple[str, ...]:
    """The registered source names (built-in first), `none` excluded."""
    return tuple(_BUILTIN) + tuple(n for n in _registered if n not in _BUILTIN)


def register(source: LabelSource) -> LabelSource:
    """Make `source` selectable as `ingest.labels_format: <source.name>`; a name in use is refused."""
    name = getattr(source, "name", "")
    if not isinstance(name, str) or not name.isidentifier() or name == NONE:
        raise ValueError(f"a label source needs a `name` that is an identifier other than {NONE!r}, got {name!r}")
    if name in _BUILTIN or name in _registered:
        raise ValueError(f"label source {name!r} is already registered")
    if not callable(getattr(source, "read", None)):
        raise ValueError(f"label source {name!r} has no read(cfg) method")
    _registered[name] = source
    return source


def unregister(name: str) -> None:
    """Remove a source added with `register` (built-in sources stay)."""
    _registered.pop(name, None)


def get(name: str) -> LabelSource:
    if name in _registered:
        return _registered[name]
    if name in _BUILTIN:
        from headct.data.label_sources import cq500, rsna2019, table  # pandas comes with them

        return {"cq500": cq500, "rsna2019": rsna2019, "table": table}[name].SOURCE
    raise ConfigError(f"ingest.labels_format: unknown label source {name!r}; known: {NONE}, {', '.join(names())}")


def load(cfg: IngestConfig) -> LabelRows | None:
    """The rows of the configured source, validated (None for `none`). Bad file -> InputError naming it."""
    if cfg.labels_format == NONE:
        return None
    from headct.data.label_sources.base import check_rows

    source = get(cfg.labels_format)
    return check_rows(source.read(cfg), cfg.labels_format)


def join(rows: LabelRows | None, scans: list[ScanKeys], found: Discovery | None = None
         ) -> tuple[pd.DataFrame, int, dict[str, int]]:
    """labels.csv rows for `scans` (scan_id, patient_id, one Int64 column per label of the source), the number of
    scans no label row reached, and the join's counts for the summary (`base.join`; `found`: what discovery met,
    to tell why a key reached no scan)."""
    from headct.data.label_sources.base import Seen
    from headct.data.label_sources.base import join as join_rows

    return join_rows(rows, scans, None if found is None else Seen.of(found.headers, found.bad_files))


def write_issues(folder: Path, rows: LabelRows | None, counts: dict[str, int], unlabelled: int) -> Path | None:
    """`<folder>/label_issues.csv` when labels were read (`rows`): one row (reason, count) per label-side fact of
    the join (`counts`, the summary's `label_*` keys without the prefix) and `scans_unlabelled`; counts only,
    never an ID, key or path. Zero counts are written too, so two runs compare row by row."""
    from headct.io import write_text

    if rows is None:
        return None

    rows = [(key.removeprefix("label_"), int(n)) for key, n in counts.items() if key.startswith("label_")]
    rows.append(("scans_unlabelled", int(unlabelled)))
    path = Path(folder) / ISSUES
    write_text(path, "reason,count\n" + "".join(f"{reason},{n}\n" for reason, n in rows))
    return path
