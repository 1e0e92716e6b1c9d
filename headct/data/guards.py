"""Ingest's guards against ordinary faults, in one place (what each guarantees: docs/reliability.md).

- `check_paths`: SRC, DEST and the local output folders are checked before anything is read or written: SRC
  must be a folder other than DEST (a DEST inside SRC is left out of the walk: discovery.list_files); DEST and
  the folders of the linkage file and the reports must be folders this process can write (a DEST that is a
  file, or read-only, stops the run with one line naming it, before anything is created).
- `shown`: how a source file or folder is named on the terminal, the only place a source path appears: relative
  to SRC, with rich markup and bytes that are not UTF-8 escaped.
- `unexpected`: an exception no check foresaw while one series is checked or converted becomes that series'
  reject (`internal_error`, the exception's type in rejects.csv, its text on the terminal), never the run's end.
- `source_key` / `first_file_key`: the pseudonym key for a source: the configured one, or the public demo key
  only when every file read was written by `headct synth` (its marker, headct/data/identity.py); otherwise the
  run stops with one line naming a file that is not synthetic. `first_file_key` checks the first readable file
  before the walk's full discovery, so a real export without a key stops at once.
- `check_recipe` / `check_source`: a store holds one preprocessing recipe and one source. A run whose
  preprocess version differs from DEST's preprocess.json, or whose SRC differs from the one DEST was ingested
  from (`source.json`: a keyed hash of SRC's path, not the path), is refused before anything is converted,
  unless `ingest.rebuild: true`, which converts every series again and removes the volumes the new manifest
  does not name. So an existing store is never a mix of recipes, and a second SRC never deletes the first's
  volumes as orphans.
- `verdict`: why a finished run must exit non-zero: nothing usable, or more than `ingest.max_reject_fraction`
  of the series broken (`BROKEN` reasons; series set aside by a QC rule or by selection do not count).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from headct.config.base import PreprocessSpec
from headct.data import store
from headct.data.identity import Pseudonymizer, choose_key, demo_key_refusal
from headct.data.series import SliceHeader
from headct.errors import InputError

SOURCE = "source.json"  # {"source_id": keyed hash of SRC's absolute path}: which SRC this store was ingested from
FIRST_FILES = 50  # files looked at for the early key check (a reads.csv or README beside the series is skipped)

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


def source_key(headers: list[SliceHeader], configured: bytes | None, src: Path,
               warn: Callable[[str], None] | None, first: bool = False) -> bytes:
    """The key for a source whose files read as `headers` (module docstring); InputError when the demo key
    would be used for a file `headct synth` did not write (`first`: the headers are the first file's only)."""
    real = [h for h in headers if not h.synthetic]
    key = choose_key(configured, synthetic=bool(headers) and not real, warn=warn)
    if key is None:
        count = None if first else len({h.path for h in real})
        raise InputError(demo_key_refusal(count, shown(real[0].path, src), configured is not None))
    return key


def first_file_key(files: list[Path], configured: bytes | None, src: Path) -> None:
    """Before discovery: refuse at once when the demo key would apply and the first readable file (of the first
    FIRST_FILES) is not synthetic. Nothing is decided here for a source that passes: `source_key` decides."""
    from headct.data.discovery import read_headers

    if choose_key(configured, synthetic=False, warn=None) is not None:
        return  # a real key is set
    for path in files[:FIRST_FILES]:
        headers = read_headers([path], src).headers
        if headers:
            source_key(headers[:1], configured, src, warn=None, first=True)
            return


def _recipe(spec: dict[str, Any]) -> str:
    return f"shape {list(spec.get('shape') or [])} at {spec.get('spacing_mm')} mm, version {spec.get('version')}"


def check_recipe(dest: Path, spec: PreprocessSpec, rebuild: bool) -> None:
    """Refuse a run whose preprocessing differs from the existing store's (module docstring)."""
    path = dest / store.PREPROCESS
    if rebuild or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc}); set ingest.rebuild=true to write the store again") \
            from None
    if not isinstance(stored, dict) or stored.get("version") != spec.version:
        ours = _recipe({**spec.model_dump(mode="json"), "version": spec.version})
        theirs = _recipe(stored) if isinstance(stored, dict) else "unknown"
        raise InputError(f"{dest} holds volumes of another preprocessing recipe ({theirs}) than this run's "
                         f"({ours}); a store holds one recipe. Ingest into a new DEST, or set ingest.rebuild=true "
                         "to convert every series again (the store's volumes are replaced)")


def source_id(pseudo: Pseudonymizer, src: Path, root: Path) -> str:
    """A keyed hash of SRC's path (`src_<16 hex>`): which source a store holds, without the path. The path under
    the project root when SRC lies in it (the same store bytes in every checkout), else the absolute path."""
    src, root = Path(src).resolve(), Path(root).resolve()
    return pseudo.source((src.relative_to(root) if src.is_relative_to(root) else src).as_posix())


def check_source(dest: Path, source: str, rebuild: bool) -> None:
    """Refuse a run from another SRC than the one DEST was ingested from (module docstring)."""
    path = dest / SOURCE
    if rebuild or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("source_id")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored != source:
        raise InputError(f"{dest} was ingested from another SRC (or with another pseudonym key): a store holds one "
                         "source, and this run would remove its volumes as orphans. Ingest into a new DEST (one "
                         "store per export; splits and pre-training read several stores' scans through their "
                         "own manifests), or set ingest.rebuild=true to replace the store with this SRC")


def write_source(dest: Path, source: str) -> None:
    from headct.io import write_json

    write_json(dest / SOURCE, {"source_id": source})
