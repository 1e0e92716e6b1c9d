"""Ingest's guards against ordinary faults, in one place (what each guarantees: docs/reliability.md).

- `check_paths`: SRC, DEST and the local output folders are checked before anything is read or written: SRC
  must be a folder other than DEST (a DEST inside SRC is left out of the walk: discovery.list_files); DEST and
  the folders of the linkage file and the reports must be folders this process can write (a DEST that is a
  file, or read-only, stops the run with one line naming it, before anything is created).
- `shown`: how a source file or folder is named on the terminal, the only place a source path appears: relative
  to SRC, with rich markup and bytes that are not UTF-8 escaped.
- `unexpected`: an exception no check foresaw while one series is checked or converted becomes that series'
  reject (`internal_error`, the exception's type in rejects.csv, its text on the terminal), never the run's end.
- `verdict`: why a finished run must exit non-zero: nothing usable, or more than `ingest.max_reject_fraction`
  of the series broken (`BROKEN` reasons; series set aside by a QC rule or by selection do not count).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.markup import escape

from headct.errors import InputError

# Reasons that mean a series' files are broken (cannot be read or placed as they are), as opposed to a series
# set aside by a QC rule (localizer, dose report, kernel ...) or by selection (not_selected, duplicate): the
# numerator of `ingest.max_reject_fraction`.
BROKEN = frozenset({"invalid_header", "no_pixel_data", "pixel_data_mismatch", "too_large", "missing_geometry",
                    "inconsistent_geometry", "unreadable", "not_finite", "not_hu", "internal_error"})


def shown(path: Path, src: Path) -> str:
    """`path` for the terminal: relative to SRC when under it, markup-escaped, non-UTF-8 bytes as \\x escapes."""
    if path.is_relative_to(src):
        path = path.relative_to(src)
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return escape(text)


def unexpected(stage: str, exc: BaseException) -> tuple[str, str]:
    """(reason, rejects.csv message) for an exception no check foresaw; the message holds no path (only the
    exception's type: its text may quote a file name)."""
    return "internal_error", f"{stage} failed unexpectedly ({type(exc).__name__}); the terminal has the details"


def writable_folder(folder: Path, what: str) -> None:
    """Refuse a `folder` that is a file, or that cannot be written (or created: its nearest existing parent
    cannot be written). Creates nothing: a throw-away temp file tests the folder or that parent, since access
    bits lie on read-only mounts."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {folder} cannot be created: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(f"{what} {folder} cannot be written ({exc.strerror or type(exc).__name__})") from None


def check_paths(src: Path, dest: Path, outputs: dict[str, Path]) -> None:
    """The checks of the module docstring; `outputs`: {description: folder} of the other folders written."""
    if not src.is_dir():
        raise InputError(f"ingest source {src} is not a folder")
    if os.path.realpath(src) == os.path.realpath(dest):
        raise InputError(f"ingest source and destination are the same folder ({src}): the store needs a folder "
                         "of its own (a DEST inside SRC is fine: the walk leaves it out)")
    writable_folder(dest, "ingest destination")
    for what, folder in outputs.items():
        writable_folder(folder, what)


def verdict(summary: dict[str, Any], max_reject_fraction: float) -> str | None:
    """Why the run must exit non-zero (the store and reports are written all the same), or None."""
    seen, broken = summary["series_seen"], summary["series_broken"]
    where = " (see rejects.csv and the terminal)"
    if seen and not summary["accepted"]:
        return f"no usable series: none of the {seen} series found was accepted{where}"
    if seen and broken / seen > max_reject_fraction:
        return (f"{broken} of {seen} series were rejected as broken ({broken / seen:.0%}), more than "
                f"ingest.max_reject_fraction={max_reject_fraction:g}{where}")
    return None
