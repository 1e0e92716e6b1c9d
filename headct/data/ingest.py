"""Ingest a folder of DICOM series and NIfTI files into the canonical store: discover -> select -> convert -> write.

Every step asks the input format of a series (headct.data.formats: classic DICOM, Enhanced CT, NIfTI, and any
format registered there) and never branches on one itself.
1. discover (headct.data.discovery): every file under SRC, offered to the registered formats (DICOM recognised by
   content, headers only; Enhanced CT split into one slice per frame; DICOMDIR indexes counted and skipped; NIfTI
   by name); in parallel; unreadable files are named on the terminal only. The same SOP instance found twice is
   read once.
2. select: group by study/series key, QC every series against `ingest.qc`, rank the valid ones of each study
   (`headct.data.selection`, where the reason codes and the preference order are documented); with `--shard`
   only the studies of that shard go on.
3. convert (`headct.data.convert`): per study the best series (or, with `keep: all`, every valid one): pixels ->
   HU -> canonical grid -> `volumes/<scan_id>.npy`, in worker processes capped by memory (`headct.data.parallel`);
   when its pixels turn out unusable or the grid crops too much of the head (`qc.max_crop_mm`) the next-ranked
   series is tried. A volume already converted with the same preprocess version
   (manifest or journal of an interrupted run) is reused, not re-converted.
4. deduplicate: accepted series with the same pixel content or SOP instances keep one copy (`headct.data.dedup`).
5. write: manifest, rejects, labels (joined by `headct.data.label_sources`), preprocess.json (DEST, or
   DEST/shards/<K>of<N>/ for a shard), optional NIfTI exports, and the local linkage file (outside DEST and the
   reports). The job (`pipelines/ingest.py`) writes the reports from the returned summary.
Before step 1 the paths, the pseudonym key (headct.data.guards: demo key only for `headct synth` data) and the
store's lock (headct.data.locks), recipe and source are checked.
Only pseudonyms leave this module, except in terminal messages about a bad file and the linkage file.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from headct.config.data import IngestConfig
from headct.data import buffers, dedup, formats, guards, label_sources, locks, parallel, shards, store
from headct.data.convert import convert_study, crop_problem
from headct.data.criteria import read_criteria
from headct.data.discovery import (
    Discovery,
    Listing,
    drop_repeated_instances,
    group_series,
    list_files,
    read_headers,
)
from headct.data.identity import Pseudonymizer, configured_key, write_linkage
from headct.data.label_sources.base import ScanKeys, scan_keys
from headct.data.selection import QcResult, qc_series, rank_series, slice_thickness_mm, why_not_selected
from headct.data.series import Series, StackGeometry
from headct.errors import InputError


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
    key_source: str = "dicom"  # patient_key_source of the manifest: "dicom" | "dataset" | "self"
    instances_id: str = ""  # keyed hash of the SOP instances ("" for formats without them, e.g. NIfTI)


@dataclass(frozen=True)
class IngestResult:
    summary: dict[str, Any]  # counts (JSON-able, pseudonymous)
    manifest_rows: list[dict[str, Any]]


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def _discover(files: list[Path], src: Path, run: Callable, progress: Progress, workers: int) -> Discovery:
    size = max(16, min(512, len(files) // (workers * 8) + 1))
    chunks = [(files[i : i + size], src) for i in range(0, len(files), size)]
    task = progress.add_task("reading headers", total=len(files))
    headers, bad, other, index = [], [], 0, 0
    for (chunk, _), found in run(read_headers, chunks):
        headers += found.headers
        bad += found.bad_files
        other += found.other_files
        index += found.index_files
        progress.advance(task, len(chunk))
    headers.sort(key=lambda h: (str(h.path), h.frame))  # completion order varies; outputs must not
    return Discovery(headers, sorted(bad), other, index)


def _plan(series_list: list[Series], cfg: IngestConfig, pseudo: Pseudonymizer,
          shard: shards.Shard | None, warn: Callable[[str], None]) -> dict[str, list[SeriesRecord]]:
    """QC every series (of this shard's studies); per study, the valid records ranked best first, then the
    rejected ones."""
    criteria = read_criteria(cfg.qc.criteria_csv) if cfg.qc.criteria_csv is not None else None
    studies: dict[str, list[SeriesRecord]] = defaultdict(list)
    limit = parallel.series_limit()  # one series' conversion must fit in memory: checked before any decode
    for series in series_list:
        study_id = pseudo.study(series.study_uid)
        if shard is not None and not shard.holds(study_id):
            continue
        try:
            qc = parallel.memory_check(series, qc_series(series, cfg.qc, criteria), cfg.preprocess, limit)
            # DICOM PatientID ("dicom"), the dataset's folder (`SYNCT12 SYNCT12` -> SYNCT12, "dataset"), or the
            # file itself ("self", a NIfTI): the format knows
            key, source = formats.of(series).patient_key(series, cfg.patient_key, cfg.src)
        except Exception as exc:  # unforeseen: this series' reject (guards.unexpected), the run goes on
            qc, key, source = QcResult(*guards.unexpected("QC", exc)), None, "dicom"
            warn(f"series not used (internal_error): {guards.shown(series.first.path.parent, cfg.src)}: "
                 f"{escape(f'{type(exc).__name__}: {exc}')}")
        else:
            if qc.reason in guards.BROKEN:  # a broken file is named (rule-based rejects are routine: rejects.csv)
                warn(f"series not used ({qc.reason}): {guards.shown(qc.path or series.first.path.parent, cfg.src)}:"
                     f" {escape(qc.message)}")
        sops = [s.sop_instance_uid for s in series.slices if s.sop_instance_uid]
        record = SeriesRecord(series, pseudo.series(series.series_uid), study_id, key,
                              pseudo.patient(key) if key else "", qc.reason, qc.message, qc.geometry, source,
                              pseudo.instances(sops) if sops else "")
        if record.reason is None and key is None:
            where = "PatientID" if cfg.patient_key == "dicom" else "patient folder under SRC"
            record.reason, record.message = "no_patient_key", f"no patient key (no {where})"
        studies[series.study_uid].append(record)
    for study_uid, records in studies.items():
        by_uid = {r.series.series_uid: r for r in records}
        valid = rank_series([(r.series, r.geometry) for r in records if r.reason is None], cfg.qc)
        studies[study_uid] = [by_uid[s.series_uid] for s, _ in valid] + [r for r in records if r.reason]
    return dict(studies)


def _manifest_row(record: SeriesRecord, facts: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    first, g = record.series.first, record.geometry
    rows_mm, cols_mm = g.pixel_spacing
    return {
        "scan_id": record.scan_id, "study_id": record.study_id, "patient_id": record.patient_id,
        "patient_key_source": record.key_source,
        "volume": store.volume_relpath(record.scan_id), "affine": json.dumps(facts["affine"]),
        "spacing_mm": facts["spacing_mm"],
        "src_shape": json.dumps([g.cols, g.rows, g.n_slices]),  # (x, y, z) = (columns, rows, slices)
        "src_spacing_mm": json.dumps([cols_mm, rows_mm, round(g.step_mm, 4)]),
        "slice_thickness_mm": slice_thickness_mm(record.series, g), "tilt_deg": round(g.tilt_deg, 3),
        "kvp": first.kvp, "kernel": first.kernel, "manufacturer": first.manufacturer,
        "body_part": first.body_part, "series_description": first.series_description, "n_slices": g.n_slices,
        "preprocess_version": cfg.preprocess.version, "volume_sha256": facts["volume_sha256"],
        "source_format": formats.of(record.series).source_format,
        "content_sha256": facts["content_sha256"], "instances_id": record.instances_id,
        **dict(zip(store.CROP_COLUMNS, facts["crop_mm"], strict=True)), "pixel_fix": facts["pixel_fix"],
    }


def _convert(studies: dict[str, list[SeriesRecord]], previous: dict[str, dict], cfg: IngestConfig,
             run: Callable, progress: Progress, tables: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Convert (or reuse) the best usable series of every study, or every valid one with `keep: all`.
    Returns scan_id -> volume facts, and the scan_ids whose facts were reused."""
    accepted: dict[str, dict[str, Any]] = {}
    reused: set[str] = set()
    tasks, largest = [], 0
    for records in studies.values():
        candidates = [r for r in records if r.reason is None]
        groups = [candidates] if cfg.keep == "best" else [[r] for r in candidates]
        for group in groups:
            if not group:
                continue
            first = previous.get(group[0].scan_id)
            if first is not None and crop_problem(first["crop_mm"], cfg.preprocess, cfg.qc.max_crop_mm) is None:
                accepted[group[0].scan_id] = first  # the preferred series is already in the store: no task at all
                reused.add(group[0].scan_id)
                continue
            largest = max([largest] + [parallel.series_bytes(r.series, cfg.preprocess) for r in group])
            tasks.append(([(r.scan_id, r.series, r.geometry, previous.get(r.scan_id)) for r in group],
                          cfg.preprocess, cfg.dest, cfg.qc.max_crop_mm))
    in_flight = 1
    if tasks:
        in_flight, why = parallel.choose_workers(cfg.workers, largest)
        progress.console.print(f"converting with {why}")
        tasks.sort(key=lambda task: -len(task[0][0][1].slices))  # largest first: the last to finish is a small one
    by_scan = {r.scan_id: r for records in studies.values() for r in records}
    bar = progress.add_task("converting", total=len(tasks))
    with store.Journal(tables) as journal:
        for _, attempts in run(convert_study, tasks, in_flight):
            for attempt in attempts:
                record = by_scan[attempt.scan_id]
                if attempt.reason is None:
                    accepted[record.scan_id] = attempt.volume
                    if attempt.message == "reused":
                        reused.add(record.scan_id)
                    else:
                        journal.append(_manifest_row(record, attempt.volume, cfg))
                else:
                    record.reason, record.message = attempt.reason, attempt.message
                    where = guards.shown(attempt.path, cfg.src) if attempt.path is not None else ""
                    progress.console.print(f"[yellow]series not used ({attempt.reason}): {where}: "
                                           f"{escape(attempt.terminal)}")
            progress.advance(bar)
    return accepted, reused


def _deduplicate(studies: dict[str, list[SeriesRecord]], accepted: dict[str, dict[str, Any]], cfg: IngestConfig
                 ) -> int:
    """Reject accepted series that duplicate another (headct.data.dedup); their volumes are removed."""
    by_scan = {r.scan_id: r for records in studies.values() for r in records}
    rows = [{"scan_id": s, "content_sha256": f["content_sha256"], "instances_id": by_scan[s].instances_id}
            for s, f in accepted.items()]
    duplicates = dedup.find_duplicates(rows)
    for scan_id, (kept, what) in duplicates.items():
        record = by_scan[scan_id]
        record.reason, record.message = "duplicate", dedup.message(kept, what)
        del accepted[scan_id]
        store.remove_volume(cfg.dest, scan_id)
    return len(duplicates)


def _tables(studies: dict[str, list[SeriesRecord]], accepted: dict[str, dict], cfg: IngestConfig
            ) -> tuple[list[dict], list[dict], list[dict]]:
    """Manifest rows, reject rows (every other series, with its reason) and linkage rows (every series)."""
    manifest, rejects, linkage = [], [], []
    for records in studies.values():
        winner = next((r for r in records if r.scan_id in accepted), None)
        for record in records:
            if record.scan_id in accepted:
                manifest.append(_manifest_row(record, accepted[record.scan_id], cfg))
            else:
                if (record.reason is None and winner is not None and record.instances_id
                        and record.instances_id == winner.instances_id):
                    # the kept series exported twice within the study: a copy, not a competing series
                    record.reason, record.message = "duplicate", dedup.message(winner.scan_id, "SOP instances")
                if record.reason is None:  # valid, but another series of the study was preferred
                    record.reason = "not_selected"
                    record.message = "valid; " + (why_not_selected(
                        (record.series, record.geometry), (winner.series, winner.geometry), cfg.qc)
                        if winner is not None else "no series of this study could be converted")
                rejects.append({"series_id": record.scan_id, "study_id": record.study_id,
                                "reason": record.reason, "message": record.message})
            linkage.append({
                "scan_id": record.scan_id, "study_id": record.study_id, "patient_id": record.patient_id,
                "status": "accepted" if record.scan_id in accepted else record.reason,
                "patient_key": record.patient_key or "", "patient_key_source": record.key_source,
                "study_uid": record.series.study_uid, "series_uid": record.series.series_uid,
                "source_folder": str(record.series.first.path.parent), "n_files": len(record.series.slices),
            })
    manifest.sort(key=lambda r: (r["patient_id"], r["study_id"], r["scan_id"]))
    rejects.sort(key=lambda r: (r["study_id"], r["series_id"]))
    return manifest, rejects, linkage


def _scan_keys(manifest: list[dict], studies: dict[str, list[SeriesRecord]], src: Path) -> list[ScanKeys]:
    """The source keys (patient, UIDs, SOP instances, paths) of every accepted scan, for the label join only."""
    by_scan = {r.scan_id: r for records in studies.values() for r in records}
    return [scan_keys(row["scan_id"], row["patient_id"], by_scan[row["scan_id"]].patient_key,
                      by_scan[row["scan_id"]].series, src) for row in manifest]


def linkage_path(cfg: IngestConfig, root: Path) -> Path:
    """Where the pseudonym <-> source linkage goes; refused inside DEST or the report folder (shared outputs)."""
    path = (cfg.linkage or root / "private" / "linkage" / f"{cfg.dest.name}.csv").resolve()
    for shared in (cfg.dest.resolve(), cfg.report_dir.resolve()):
        if path.is_relative_to(shared):
            raise InputError(f"ingest.linkage={path} lies inside {shared}, a shared output; put it elsewhere")
    return path


def ingest(cfg: IngestConfig, root: Path, console: Console, key: bytes | None = None) -> IngestResult:
    """Run the whole ingestion (module docstring); paths in `cfg` are absolute. Bad input -> InputError.

    `key`: a pseudonym key to use instead of the configured one (a throw-away key for one-off inference, whose
    pseudonyms are never stored).

    With workers > 1 the pool spawns processes, so a script calling this needs the usual
    `if __name__ == "__main__":` guard (the `headct` command and `python -c` need nothing).
    """
    started = time.perf_counter()
    parallel.warm(parallel.cpu_count() if cfg.workers == "auto" else cfg.workers)  # while the checks run
    shard = shards.parse(cfg.shard)
    linkage = linkage_path(cfg, root)
    if shard is not None:
        linkage = shards.linkage_file(linkage, shard)
    guards.check_paths(cfg.src, cfg.dest, {"linkage folder": linkage.parent})  # before anything is read
    listing = list_files(cfg.src, exclude=(cfg.dest,))
    for folder, why in listing.unreadable_folders:
        console.print(f"[yellow]folder not read ({escape(why)}): {guards.shown(folder, cfg.src)}")
    files = listing.files
    if not files:
        n = len(listing.unreadable_folders)
        raise InputError(f"ingest source {cfg.src} is empty" + (f" ({n} folder(s) could not be read)" if n else ""))
    configured = configured_key() if key is None else key  # a bad key fails before any work
    guards.first_file_key(files, configured, cfg.src)  # real data without a key fails at its first file
    tables = shards.folder(cfg.dest, shard) if shard is not None else cfg.dest
    label_rows = label_sources.load(cfg)  # read first: a wrong labels file should fail before any work
    if cfg.qc.criteria_csv is not None:
        read_criteria(cfg.qc.criteria_csv)  # likewise: a bad criteria file fails now, naming itself

    def warn(message: str) -> None:
        console.print(f"[yellow]{message}")

    what = "headct ingest" + (f" --shard {cfg.shard}" if shard else "")
    with locks.writing(cfg.dest, what, tables if shard is not None else None, warn):  # one writer per store
        guards.check_recipe(cfg.dest, cfg.preprocess, cfg.rebuild)  # a store holds one recipe
        return _ingest(cfg, root, console, listing, shard, tables, linkage, configured, label_rows, started, warn)


def _ingest(cfg: IngestConfig, root: Path, console: Console, listing: Listing, shard: shards.Shard | None,
            tables: Path, linkage: Path, configured: bytes | None, label_rows: Any, started: float,
            warn: Callable[[str], None]) -> IngestResult:
    """`ingest` past its checks, holding the store's lock."""
    files = listing.files
    previous = store.converted_rows(cfg.dest, cfg.preprocess.version, tables, warn) if tables.is_dir() else {}
    readers = parallel.cpu_count() if cfg.workers == "auto" else cfg.workers

    # spawned workers start with the default formats: hand them this process's (one registered by a caller too)
    with _progress(console) as progress, parallel.pool(readers, formats.install, (formats.registered(),)) as run:
        found = _discover(files, cfg.src, run, progress, readers)
        for path, why in found.bad_files:
            progress.console.print(f"[yellow]skipped {guards.shown(path, cfg.src)}: {escape(why)}")
        headers, repeated = drop_repeated_instances(found.headers)
        for path, kept in repeated:
            progress.console.print(f"[yellow]skipped {guards.shown(path, cfg.src)}: the same SOP instance as "
                                   f"{guards.shown(kept, cfg.src)}")
        if not headers:
            names = ", ".join(f.name for f in formats.registered())
            raise InputError(f"no readable DICOM or NIfTI file under {cfg.src} ({len(files)} files looked at; "
                             f"formats tried: {names})")
        pseudo = Pseudonymizer(guards.source_key(headers, configured, cfg.src, warn))
        source = guards.source_id(pseudo, cfg.src, root)
        guards.check_source(cfg.dest, source, cfg.rebuild)  # a second SRC would remove the first's volumes
        studies = _plan(group_series(headers), cfg, pseudo, shard, lambda text: progress.console.print(
            f"[yellow]{text}"))
        accepted, reused = _convert(studies, previous, cfg, run, progress, tables)
    buffers.release()  # the last stack of a conversion in this process (1 worker): nothing is kept between runs

    duplicates = _deduplicate(studies, accepted, cfg) if shard is None else 0  # shards: at merge
    manifest, rejects, linkage_rows = _tables(studies, accepted, cfg)
    labels, unlabelled, label_counts = label_sources.join(label_rows, _scan_keys(manifest, studies, cfg.src),
                                                          found)  # what discovery met: why keys reached no scan
    store.write_manifest(tables, manifest)
    store.write_rejects(tables, rejects)
    store.write_labels(tables, labels)
    label_sources.write_issues(tables, label_rows, label_counts, unlabelled)  # label-side problems, counts
    store.write_preprocess(cfg.dest, cfg.preprocess)
    guards.write_source(cfg.dest, source)
    store.Journal(tables).remove()  # the manifest now holds every finished row
    exported = store.export_nifti(cfg.dest, manifest) if cfg.export_nifti else 0
    # a shard shares volumes/ with the others, so only a whole run may clear what its manifest does not name
    orphans = store.remove_orphan_volumes(cfg.dest, {row["scan_id"] for row in manifest}) if shard is None else 0
    write_linkage(linkage, linkage_rows)

    summary = {
        "studies_seen": len(studies),
        "series_seen": sum(len(records) for records in studies.values()),
        **{f"files_{name}": len({h.path for h in found.headers if formats.get(h.format).source_format == name})
           for name in formats.source_formats()},  # files_dicom (classic and Enhanced CT), files_nifti, ...
        "files_dicomdir": found.index_files,
        "files_repeated": len(repeated),
        "files_unreadable": len(found.bad_files),
        "files_other": found.other_files,
        "folders_unreadable": len(listing.unreadable_folders),
        "accepted": len(manifest),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "series_broken": sum(r["reason"] in guards.BROKEN for r in rejects),  # see ingest.max_reject_fraction
        "duplicates": duplicates,
        "studies_without_volume": len(studies) - len({row["study_id"] for row in manifest}),
        # accepted scans whose head the grid cut along some axis (by at most qc.max_crop_mm; mm in the manifest)
        "heads_cropped": sum(any(row[c] > 0 for c in store.CROP_COLUMNS) for row in manifest),
        "converted": len(manifest) - len(reused & {row["scan_id"] for row in manifest}),
        "reused": len(reused & {row["scan_id"] for row in manifest}),
        "nifti_exported": exported,
        "orphan_volumes_removed": orphans,
        "unlabelled_scans": unlabelled,
        **label_counts,
        "preprocess_version": cfg.preprocess.version,
        "shard": cfg.shard or "",
        "seconds": round(time.perf_counter() - started, 1),
    }
    if shard is not None:
        shards.write_info(cfg.dest, shard, {**cfg.preprocess.model_dump(mode="json"),
                                            "version": cfg.preprocess.version}, summary)
    return IngestResult(summary, manifest)


def merge(cfg: IngestConfig, stores: list[Path], root: Path) -> dict[str, Any]:
    """`headct ingest merge DEST [STORE...]`: join the shards under the stores into `stores[0]`."""
    if not stores:
        raise InputError("ingest merge needs at least the store folder DEST")
    cfg = cfg.model_copy(update={"dest": stores[0]})
    with locks.writing(stores[0], "headct ingest merge"):  # no shard may still be writing
        return shards.merge(stores, linkage_path(cfg, root))
