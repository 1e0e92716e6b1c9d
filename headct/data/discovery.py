"""Discovery: every file under SRC, each recognised by a registered input format, read as slice headers (no
pixels), then grouped into series.

Each file is offered to the formats of `headct.data.formats.FORMATS` in order: the first that claims it (by its
content, e.g. DICOM's `DICM` preamble, or by its name where the format's reader needs one, e.g. NIfTI) and reads
it owns it. A file no format owns is counted as "other" (e.g. a reads.csv beside the series); a file whose reading
fails is listed by name with the reason, for the user's terminal only, and the run goes on.
Headers are grouped by their (study, series) key, whatever the format: formats without UIDs make keys that
cannot collide with UIDs (NIfTI: `nifti:<path under SRC>`).
Memory bound: discovery streams the files through the workers one header parse at a time (no pixel data is read)
and keeps only the file list and one SliceHeader per slice: about 2.6 KB a file, measured on 100,000 RSNA-style
slices by benchmarks/discovery.py (about 2 GB for RSNA 2019's 750,000 files), whatever the pixels' size.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from headct.data import formats
from headct.data.formats.base import InputFormat, Probe
from headct.data.series import Series, SliceHeader


@dataclass(frozen=True)
class Discovery:
    headers: list[SliceHeader]
    bad_files: list[tuple[Path, str]]  # (path, why): for the user's terminal only
    other_files: int  # files no format reads (e.g. a reads.csv beside the series)
    index_files: int = 0  # media indexes (DICOMDIR): recognised and skipped (the images they list are read directly)


@dataclass(frozen=True)
class Listing:
    files: list[Path]
    unreadable_folders: list[tuple[Path, str]]  # (folder, why) the walk could not open: for the terminal only


def list_files(src: Path, exclude: tuple[Path, ...] = ()) -> Listing:
    """Every file under `src`, recursively, in a deterministic order; linked folders are followed once; the
    folders `exclude` (e.g. a DEST inside SRC) are left out; a folder that cannot be listed (permission
    denied) is recorded with the reason instead of being skipped silently."""
    found, unreadable, seen = [], [], set()
    skip = {os.path.realpath(folder) for folder in exclude}

    def failed(exc: OSError) -> None:
        unreadable.append((Path(exc.filename or src), exc.strerror or type(exc).__name__))

    for folder, dirs, files in os.walk(src, followlinks=True, onerror=failed):
        real = os.path.realpath(folder)
        if real in seen or real in skip:  # a link back to a folder already walked (a cycle), or left out
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(folder) / name for name in sorted(files))
    return Listing(found, sorted(unreadable))


def read_headers(paths: list[Path], src: Path | None = None) -> Discovery:
    """The headers of `paths` (SRC: the folder being ingested, for formats that key files by their path under
    it); unowned files counted, indexes counted apart, broken ones listed with the reason."""
    headers, bad, other, index = [], [], 0, 0
    for path in paths:
        probe = Probe(path, src)
        for fmt in formats.registered():
            try:
                found = fmt.read(probe) if fmt.claims(probe) else None
            except Exception as exc:  # any parse failure of one file is reported by name; the run goes on
                bad.append((path, f"unreadable {fmt.label} ({type(exc).__name__}: {exc})"))
                break
            if found is None:
                continue
            if found.problem:
                bad.append((path, found.problem))
            index += found.index
            headers.extend(found.headers)
            break
        else:
            other += 1
    return Discovery(headers, bad, other, index)


def recognise(path: Path) -> InputFormat | None:
    """The registered format that reads the single file `path`, or None (nothing registered owns it)."""
    probe = Probe(path)
    for fmt in formats.registered():
        try:
            if fmt.claims(probe) and fmt.read(probe) is not None:
                return fmt
        except Exception:  # claimed but unreadable: still this format's file (the ingest names the error)
            return fmt
    return None


def drop_repeated_instances(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[Path, Path]]]:
    """Keep one copy of each (series, SOPInstanceUID, frame): the same instance exported twice (e.g. two
    copies of a folder) would otherwise read as two slices at one position. Returns the kept headers and
    (dropped, kept) path pairs for the terminal. Headers must be in path order (the first path is kept).
    Headers without an instance UID (formats that have none) are all kept."""
    kept, dropped, first = [], [], {}
    for header in headers:
        if not header.sop_instance_uid:
            kept.append(header)
            continue
        key = (header.study_uid, header.series_uid, header.sop_instance_uid, header.frame)
        if key in first:
            if first[key] != header.path:
                dropped.append((header.path, first[key]))
            continue
        first[key] = header.path
        kept.append(header)
    return kept, dropped


def group_series(headers: list[SliceHeader]) -> list[Series]:
    """Group slices by (study key, series key); deterministic order (by the keys, slices by path)."""
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[(header.study_uid, header.series_uid)].append(header)
    return [
        Series(study, series, tuple(sorted(groups[(study, series)], key=lambda h: str(h.path))))
        for study, series in sorted(groups)
    ]
