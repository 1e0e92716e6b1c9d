"""The seed's scan filter criteria CSV (`Study Description, KVP, Convolution Kernel`): an allow-list of protocols.

HeadCT-Foundation publishes which (study description, kVp, kernel) combinations it trained on, but never applies
the file in code. Here a series passes `ingest.qc.criteria_csv` when some row matches it:
    Study Description   equal to StudyDescription (case and surrounding spaces ignored)
    KVP                 equal to KVP (to 0.1 kV)
    Convolution Kernel  equal to ConvolutionKernel, value by value: the seed writes a multi-valued kernel as a
                        Python list (`['Hr40s', '3']`), DICOM as `Hr40s\\3`; both become ('hr40s', '3')
An empty cell matches anything, so a site can allow a protocol by description alone.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from headct.errors import InputError

COLUMNS = ("Study Description", "KVP", "Convolution Kernel")

Row = tuple[str | None, float | None, tuple[str, ...] | None]


def _description(text: str) -> str | None:
    text = " ".join(str(text).split()).casefold()
    return text or None


def _kvp(value: object) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    return round(float(value), 1)


def kernel_values(text: str) -> tuple[str, ...] | None:
    """('hr40s', '3') from `['Hr40s', '3']`, `Hr40s\\3` or `Hr40s`; None when empty."""
    text = str(text).strip()
    if not text:
        return None
    if text.startswith("["):
        values = ast.literal_eval(text)  # a list of strings as the seed wrote it; literal_eval runs no code
        if not isinstance(values, list | tuple):
            raise ValueError(f"not a list: {text}")
    else:
        values = text.split("\\")
    return tuple(str(v).strip().casefold() for v in values)


@dataclass(frozen=True)
class Criteria:
    rows: frozenset[Row]

    def matches(self, study_description: str, kvp: float | None, kernel: str) -> bool:
        series = (_description(study_description), _kvp(kvp), kernel_values(kernel))
        return any(all(want is None or want == have for want, have in zip(row, series, strict=True))
                   for row in self.rows)


def read_criteria(path: Path) -> Criteria:
    """Read the CSV; InputError naming the file and line for a missing column or an unreadable value."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: criteria file not found (ingest.qc.criteria_csv)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}")
    rows = set()
    for line, record in enumerate(frame[list(COLUMNS)].itertuples(index=False), start=2):
        try:
            rows.add((_description(record[0]), _kvp(record[1]), kernel_values(record[2])))
        except (ValueError, SyntaxError) as exc:
            raise InputError(f"{path}, line {line}: cannot read {tuple(record)} ({exc})") from exc
    if not rows:
        raise InputError(f"{path}: no rows; an empty allow-list would reject every series")
    return Criteria(frozenset(rows))
