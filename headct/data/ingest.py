"""Ingest a folder of DICOM series into the canonical store: discover -> select -> convert -> write.

1. discover: every file under SRC, recognised as DICOM by content, headers only (stop_before_pixels), in
   parallel; unreadable files are named on the terminal only.
2. select: group by Study/Series UID, QC every series, rank the valid ones of each study
   (`headct.data.selection`, where the reason codes and the preference order are documented).
3. convert: per study, the best series' pixels -> HU -> canonical grid -> `volumes/<scan_id>.npy`, in a process
   pool; when its pixels turn out unusable the next-ranked series is tried. A volume already converted with
   the same preprocess version (manifest or journal of an interrupted run) is reused, not re-converted.
4. write: manifest, rejects, labels, preprocess.json (DEST) and the local linkage file (outside DEST and
   the reports). The job (`pipelines/ingest.py`) writes the reports from the returned summary.
Only pseudonyms leave this module, except in terminal messages about a bad file and the linkage file.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from headct.config import IngestConfig, PreprocessSpec
from headct.data import store
from headct.data.dicom_series import (
    Discovery,
    PixelDataError,
    Series,
    StackGeometry,
    group_series,
    list_files,
    load_hu,
    read_headers,
)
from headct.data.identity import Pseudonymizer, load_key
from headct.data.labels import join_labels, read_cq500
from headct.data.resample import NoHeadError, to_canonical
from headct.data.selection import qc_series, rank_series, slice_thickness_mm, why_not_selected
from headct.errors import InputError
from headct.io import atomic_path


@dataclass
class SeriesRecord:
    """One series' fate; `reason` None means a candidate (accepted once converted)."""

    series: Series
    scan_id: str
    study_id: str
    patient_key: str | None  # source key: linkage file only
    patient_id: str  # its pseudonym ("" without a key)
    reason: str | None
    message: str
    geometry: StackGeometry | None


@dataclass(frozen=True)
class Attempt:
    """The outcome of converting one candidate series (returned from a worker process)."""

    scan_id: str
    reason: str | None  # None: converted
    message: str  # safe for rejects.csv
    terminal: str  # may name the source folder: for the user's terminal only
    volume: dict[str, Any] | None  # affine (16 floats), spacing_mm, volume_sha256


@dataclass(frozen=True)
class IngestResult:
    summary: dict[str, Any]  # counts (JSON-able, pseudonymous)
    manifest_rows: list[dict[str, Any]]


def convert_study(candidates: list[tuple[str, Series, StackGeometry]], spec: PreprocessSpec,
                  dest: Path) -> list[Attempt]:
    """Convert the first usable candidate of one study (best first); one Attempt per candidate tried."""
    attempts = []
    for scan_id, series, geometry in candidates:
        try:
            volume, affine = to_canonical(load_hu(series, geometry), geometry, spec)
        except PixelDataError as exc:
            attempts.append(Attempt(scan_id, "unreadable", exc.why, str(exc), None))
            continue
        except NoHeadError as exc:
            folder = series.first.path.parent
            attempts.append(Attempt(scan_id, "empty_volume", str(exc), f"{folder}: {exc}", None))
            continue
        sha = store.write_volume(dest, scan_id, volume)
        spacing = spec.spacing_mm if spec.fit == "isotropic" else None  # stretch: per axis, see the affine
        facts = {"affine": [float(v) for v in affine.ravel()], "spacing_mm": spacing, "volume_sha256": sha}
        attempts.append(Attempt(scan_id, None, "ok", "", facts))
        break
    return attempts


@contextlib.contextmanager
def _workers(n: int) -> Iterator[Callable[..., Iterator[tuple[Any, Any]]]]:
    """`run(fn, tasks)` yielding (task, fn(*task)) as they finish: in a spawn process pool, or inline for n=1.

    spawn, not fork: the parent runs rich's refresh thread, and forking a threaded process can deadlock.
    On an error or Ctrl-C the queued tasks are cancelled instead of run to the end.
    """
    if n == 1:
        yield lambda fn, tasks: ((task, fn(*task)) for task in tasks)
        return
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))

    def run(fn: Callable[..., Any], tasks: list[tuple]) -> Iterator[tuple[Any, Any]]:
        futures = {pool.submit(fn, *task): task for task in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()

    try:
        yield run
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def _discover(files: list[Path], run: Callable, progress: Progress, workers: int) -> Discovery:
    size = max(16, min(512, len(files) // (workers * 8) + 1))
    chunks = [(files[i : i + size],) for i in range(0, len(files), size)]
    task = progress.add_task("reading headers", total=len(files))
    headers, bad, other = [], [], 0
    for (chunk,), found in run(read_headers, chunks):
        headers += found.headers
        bad += found.bad_files
        other += found.other_files
        progress.advance(task, len(chunk))
    headers.sort(key=lambda h: str(h.path))  # completion order varies; outputs must not
    return Discovery(headers, sorted(bad), other)


def _patient_key(series: Series, mode: str, src: Path) -> str | None:
    """DICOM PatientID, or the first whitespace token of the top folder under SRC (`SYNCT12 SYNCT12` -> SYNCT12)."""
    if mode == "dicom":
        return series.first.patient_id or None
    parts = series.first.path.relative_to(src).parts
    tokens = parts[0].split() if len(parts) > 1 else []
    return tokens[0] if tokens else None


def _plan(series_list: list[Series], cfg: IngestConfig, pseudo: Pseudonymizer) -> dict[str, list[SeriesRecord]]:
    """QC every series; per study, the valid records ranked best first, then the rejected ones."""
    studies: dict[str, list[SeriesRecord]] = defaultdict(list)
    for series in series_list:
        qc = qc_series(series, cfg.min_slices)
        key = _patient_key(series, cfg.patient_key, cfg.src)
        record = SeriesRecord(series, pseudo.series(series.series_uid), pseudo.study(series.study_uid), key,
                              pseudo.patient(key) if key else "", qc.reason, qc.message, qc.geometry)
        if record.reason is None and key is None:
            where = "PatientID" if cfg.patient_key == "dicom" else "patient folder under SRC"
            record.reason, record.message = "no_patient_key", f"no patient key (no {where})"
        studies[series.study_uid].append(record)
    for study_uid, records in studies.items():
        by_uid = {r.series.series_uid: r for r in records}
        valid = rank_series([(r.series, r.geometry) for r in records if r.reason is None])
        studies[study_uid] = [by_uid[s.series_uid] for s, _ in valid] + [r for r in records if r.reason]
    return dict(studies)


def _manifest_row(record: SeriesRecord, facts: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    first, g = record.series.first, record.geometry
    rows_mm, cols_mm = g.pixel_spacing
    return {
        "scan_id": record.scan_id, "study_id": record.study_id, "patient_id": record.patient_id,
        "patient_key_source": "dicom" if cfg.patient_key == "dicom" else "dataset",
        "volume": store.volume_relpath(record.scan_id), "affine": json.dumps(facts["affine"]),
        "spacing_mm": facts["spacing_mm"],
        "src_shape": json.dumps([g.cols, g.rows, g.n_slices]),  # (x, y, z) = (columns, rows, slices)
        "src_spacing_mm": json.dumps([cols_mm, rows_mm, round(g.step_mm, 4)]),
        "slice_thickness_mm": slice_thickness_mm(record.series, g), "tilt_deg": round(g.tilt_deg, 3),
        "kvp": first.kvp, "kernel": first.kernel, "manufacturer": first.manufacturer,
        "body_part": first.body_part, "series_description": first.series_description, "n_slices": g.n_slices,
        "preprocess_version": cfg.preprocess.version, "volume_sha256": facts["volume_sha256"],
    }


def _convert(studies: dict[str, list[SeriesRecord]], previous: dict[str, dict], cfg: IngestConfig,
             run: Callable, progress: Progress) -> dict[str, dict[str, Any]]:
    """Convert (or reuse) the best usable series of every study; returns scan_id -> volume facts."""
    accepted: dict[str, dict[str, Any]] = {}
    tasks = []
    for records in studies.values():
        candidates = [r for r in records if r.reason is None]
        if candidates and candidates[0].scan_id in previous:
            accepted[candidates[0].scan_id] = previous[candidates[0].scan_id]
        elif candidates:
            tasks.append(([(r.scan_id, r.series, r.geometry) for r in candidates], cfg.preprocess, cfg.dest))
    by_scan = {r.scan_id: r for records in studies.values() for r in records}
    bar = progress.add_task("converting", total=len(tasks))
    with store.Journal(cfg.dest) as journal:
        for _, attempts in run(convert_study, tasks):
            for attempt in attempts:
                record = by_scan[attempt.scan_id]
                if attempt.reason is None:
                    accepted[record.scan_id] = attempt.volume
                    journal.append(_manifest_row(record, attempt.volume, cfg))
                else:
                    record.reason, record.message = attempt.reason, attempt.message
                    progress.console.print(f"[yellow]series not used ({attempt.reason}): {attempt.terminal}")
            progress.advance(bar)
    return accepted


def _tables(studies: dict[str, list[SeriesRecord]], accepted: dict[str, dict], cfg: IngestConfig
            ) -> tuple[list[dict], list[dict], list[dict]]:
    """Manifest rows, reject rows (every other series, with its reason) and linkage rows (every series)."""
    manifest, rejects, linkage = [], [], []
    for records in studies.values():
        winner = next((r for r in records if r.scan_id in accepted), None)
        for record in records:
            if record is winner:
                manifest.append(_manifest_row(record, accepted[record.scan_id], cfg))
            else:
                if record.reason is None:
                    record.reason = "not_selected"
                    record.message = "valid; " + why_not_selected(
                        (record.series, record.geometry), (winner.series, winner.geometry))
                rejects.append({"series_id": record.scan_id, "study_id": record.study_id,
                                "reason": record.reason, "message": record.message})
            linkage.append({
                "scan_id": record.scan_id, "study_id": record.study_id, "patient_id": record.patient_id,
                "status": "accepted" if record is winner else record.reason,
                "patient_key": record.patient_key or "", "patient_key_source": cfg.patient_key,
                "study_uid": record.series.study_uid, "series_uid": record.series.series_uid,
                "source_folder": str(record.series.first.path.parent), "n_files": len(record.series.slices),
            })
    manifest.sort(key=lambda r: (r["patient_id"], r["study_id"], r["scan_id"]))
    rejects.sort(key=lambda r: (r["study_id"], r["series_id"]))
    return manifest, rejects, linkage


def _labels(manifest: list[dict], studies: dict[str, list[SeriesRecord]], reads: pd.DataFrame | None
            ) -> tuple[pd.DataFrame, int]:
    """labels.csv rows and the number of scans without any known label."""
    scans = pd.DataFrame(manifest, columns=["scan_id", "patient_id"])
    if reads is None:
        return scans, len(scans)
    keys = {r.scan_id: r.patient_key for records in studies.values() for r in records}
    scans["patient_key"] = scans["scan_id"].map(keys)
    return join_labels(scans, reads)


def linkage_path(cfg: IngestConfig, root: Path) -> Path:
    """Where the pseudonym <-> source linkage goes; refused inside DEST or the report folder (shared outputs)."""
    path = (cfg.linkage or root / "private" / "linkage" / f"{cfg.dest.name}.csv").resolve()
    for shared in (cfg.dest.resolve(), cfg.report_dir.resolve()):
        if path.is_relative_to(shared):
            raise InputError(f"ingest.linkage={path} lies inside {shared}, a shared output; put it elsewhere")
    return path


def ingest(cfg: IngestConfig, root: Path, console: Console) -> IngestResult:
    """Run the whole ingestion (module docstring); paths in `cfg` are absolute. Bad input -> InputError.

    With workers > 1 the pool spawns processes, so a script calling this needs the usual
    `if __name__ == "__main__":` guard (the `headct` command and `python -c` need nothing).
    """
    started = time.perf_counter()
    if not cfg.src.is_dir():
        raise InputError(f"ingest source {cfg.src} is not a folder")
    files = list_files(cfg.src)
    if not files:
        raise InputError(f"ingest source {cfg.src} is empty")
    linkage = linkage_path(cfg, root)
    reads = None
    if cfg.labels_format == "cq500":  # read first: a wrong labels path should fail before any work
        if cfg.labels is None:
            raise InputError("ingest.labels_format=cq500 needs ingest.labels (the reads.csv path)")
        reads = read_cq500(cfg.labels)
    key, _ = load_key(cfg.demo_key, warn=lambda message: console.print(f"[yellow]{message}"))
    pseudo = Pseudonymizer(key)
    previous = store.converted_rows(cfg.dest, cfg.preprocess.version) if cfg.dest.is_dir() else {}

    with _progress(console) as progress, _workers(cfg.workers) as run:
        found = _discover(files, run, progress, cfg.workers)
        for path, why in found.bad_files:
            progress.console.print(f"[yellow]skipped {path}: {why}")
        if not found.headers:
            raise InputError(f"no readable DICOM file under {cfg.src} ({len(files)} files looked at)")
        studies = _plan(group_series(found.headers), cfg, pseudo)
        accepted = _convert(studies, previous, cfg, run, progress)

    manifest, rejects, linkage_rows = _tables(studies, accepted, cfg)
    labels, unlabelled = _labels(manifest, studies, reads)
    store.write_manifest(cfg.dest, manifest)
    store.write_rejects(cfg.dest, rejects)
    store.write_labels(cfg.dest, labels)
    store.write_preprocess(cfg.dest, cfg.preprocess)
    store.Journal(cfg.dest).remove()  # the manifest now holds every finished row
    orphans = store.remove_orphan_volumes(cfg.dest, {row["scan_id"] for row in manifest})
    with atomic_path(linkage) as tmp:
        pd.DataFrame(linkage_rows).to_csv(tmp, index=False)

    reused = sum(row["scan_id"] in previous for row in manifest)
    summary = {
        "studies_seen": len(studies),
        "series_seen": sum(len(records) for records in studies.values()),
        "files_dicom": len(found.headers),
        "files_unreadable": len(found.bad_files),
        "files_other": found.other_files,
        "accepted": len(manifest),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "studies_without_volume": len(studies) - len(manifest),
        "converted": len(manifest) - reused,
        "reused": reused,
        "orphan_volumes_removed": orphans,
        "unlabelled_scans": unlabelled,
        "preprocess_version": cfg.preprocess.version,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return IngestResult(summary, manifest)
