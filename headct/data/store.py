"""The canonical volume store on disk (the ingest -> split/pretrain/probe contract); every write is atomic.

    <store>/volumes/<scan_id>.npy   int16 HU, RAS+, array axes (x, y, z), shape = PreprocessSpec.shape
    <store>/manifest.parquet        one row per accepted series (MANIFEST_COLUMNS)
    <store>/rejects.csv             series_id, study_id, reason, message (no paths, no UIDs)
    <store>/labels.csv              scan_id, patient_id, one column per canonical label (1/0, empty = unknown)
    <store>/preprocess.json         the PreprocessSpec dump plus its "version"
    <store>/nifti/<scan_id>.nii.gz  optional (ingest.export_nifti): the canonical volume with its RAS affine
    <store>/shards/<K>of<N>/        a shard's tables (manifest.parquet, rejects.csv, labels.csv, shard.json) while
                                    `--shard` runs write into one store; `headct ingest merge` joins them

While an ingest runs, finished manifest rows are also appended to `<store>/.ingest-journal.jsonl` (pseudonyms
only), so an interrupted run can resume without re-converting; the journal is removed once the manifest is
written. A torn last journal line (the process died while writing it) is dropped with a warning; any other
malformed line, or a manifest that cannot be read, stops the run with an InputError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headct.config.base import PreprocessSpec
from headct.errors import InputError
from headct.io import atomic_path, file_sha256, write_json

VOLUMES = "volumes"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.csv"
LABELS = "labels.csv"
PREPROCESS = "preprocess.json"
JOURNAL = ".ingest-journal.jsonl"
NIFTI = "nifti"

# mm of the head's bounding box outside the canonical grid along RAS x, y, z (0: the head fits; headct.data.convert)
CROP_COLUMNS = ("crop_x_mm", "crop_y_mm", "crop_z_mm")
MANIFEST_COLUMNS = (
    "scan_id", "study_id", "patient_id", "patient_key_source", "volume", "affine", "spacing_mm", "src_shape",
    "src_spacing_mm", "slice_thickness_mm", "tilt_deg", "kvp", "kernel", "manufacturer", "body_part",
    "series_description", "n_slices", "preprocess_version", "volume_sha256", "source_format", "content_sha256",
    "instances_id", *CROP_COLUMNS, "pixel_fix",
)
REJECT_COLUMNS = ("series_id", "study_id", "reason", "message")


def volume_relpath(scan_id: str) -> str:
    return f"{VOLUMES}/{scan_id}.npy"


def write_volume(store: Path, scan_id: str, volume: np.ndarray) -> str:
    """Write one canonical volume atomically; returns the sha256 of the .npy file's bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(volume), allow_pickle=False)
    data = buffer.getvalue()
    with atomic_path(store / volume_relpath(scan_id)) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def nifti_relpath(scan_id: str) -> str:
    return f"{NIFTI}/{scan_id}.nii.gz"


def write_nifti(store: Path, scan_id: str, volume: np.ndarray, affine: np.ndarray) -> Path:
    """The canonical int16 volume as NIfTI-1 with its RAS affine (sform and qform, code 'scanner'), atomically."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(volume, np.int16), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path = store / nifti_relpath(scan_id)
    with atomic_path(path, suffix=".nii.gz") as tmp:  # nibabel picks the format from the name
        nib.save(image, tmp)
    return path


def export_nifti(store: Path, rows: list[dict[str, Any]]) -> int:
    """Write the NIfTI export of every manifest row that lacks one (a resumed run skips the others); returns
    how many were written."""
    written = 0
    for row in rows:
        if not (store / nifti_relpath(row["scan_id"])).is_file():
            write_nifti(store, row["scan_id"], read_volume(store, row["volume"]), affine_of(row))
            written += 1
    return written


def read_volume(store: Path, relpath: str) -> np.ndarray:
    """A volume ingest has just written (int16, (X, Y, Z)); `relpath` is the manifest's `volume` column.
    Ingest-side only (nothing is checked against the manifest, which may not exist yet): jobs read volumes
    through `headct.data.volumes.load_volume`, which does."""
    path = store / relpath
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read volume ({exc})") from exc


def affine_of(row: pd.Series | dict[str, Any]) -> np.ndarray:
    """The 4x4 canonical voxel index -> RAS mm matrix of a manifest row."""
    return np.asarray(json.loads(row["affine"]), float).reshape(4, 4)


def write_manifest(store: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame["spacing_mm"] = frame["spacing_mm"].astype("float64")
    frame["n_slices"] = frame["n_slices"].astype("int64")
    for column in CROP_COLUMNS:
        frame[column] = frame[column].astype("float64")
    for column in ("source_format", "content_sha256", "instances_id"):
        frame[column] = frame[column].fillna("").astype(str)
    frame["pixel_fix"] = frame["pixel_fix"].astype(object).fillna("").astype(str)  # rows built without it: ""
    with atomic_path(store / MANIFEST) as tmp:
        frame.to_parquet(tmp, index=False)


def read_manifest(store: Path) -> pd.DataFrame:
    """The manifest of a store, checked for the contract's columns (InputError naming the file otherwise)."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: file not found (run `headct ingest` first)")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
    if "pixel_fix" not in frame.columns:  # a store written before the column existed: nothing was corrected
        frame["pixel_fix"] = ""
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; re-run `headct ingest`")
    return frame


def write_rejects(store: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=list(REJECT_COLUMNS))
    with atomic_path(store / REJECTS) as tmp:
        frame.to_csv(tmp, index=False)


def write_labels(store: Path, labels: pd.DataFrame) -> None:
    """labels.csv: scan_id, patient_id, then nullable 0/1 label columns written as 1/0/empty."""
    with atomic_path(store / LABELS) as tmp:
        labels.to_csv(tmp, index=False, na_rep="")


def write_preprocess(store: Path, spec: PreprocessSpec) -> None:
    write_json(store / PREPROCESS, {**spec.model_dump(mode="json"), "version": spec.version})


def read_preprocess(store: Path) -> dict[str, Any]:
    """preprocess.json of a store (the PreprocessSpec dump plus its "version"); InputError naming the file when it
    is missing, unreadable or lacks the version or grid."""
    path = Path(store) / PREPROCESS
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (run `headct ingest` first)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(spec, dict) or not spec.get("version") or not isinstance(spec.get("shape"), list):
        raise InputError(f"{path}: no preprocessing 'version' and 'shape'; re-run `headct ingest`")
    return spec


@dataclass(frozen=True)
class StoreIndex:
    """What a volume of a store is checked against: the store's preprocessing version and grid, and per scan id
    the manifest's volume path, SHA-256 of the .npy file's bytes and preprocessing version."""

    folder: Path
    version: str
    shape: tuple[int, ...]
    volumes: dict[str, tuple[str, str, str]]  # scan_id -> (volume, volume_sha256, preprocess_version)


_INDEXES: dict[Path, tuple[tuple[int, ...], StoreIndex]] = {}
_INDEXES_LOCK = threading.Lock()  # feature extraction reads volumes on a worker thread
_MAX_INDEXES = 16  # stores kept per process (a long-lived process may open many throw-away stores)


def store_index(store: Path) -> StoreIndex:
    """The index of `store`, read once per process and re-read when its manifest or preprocess.json changes
    (their inode, size and mtime are the cache key). InputError naming the file when either is unusable."""
    folder = Path(store).resolve()
    try:
        stats = [os.stat(folder / name) for name in (MANIFEST, PREPROCESS)]
        key = tuple(v for st in stats for v in (st.st_ino, st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
        key = ()  # read_manifest / read_preprocess name the missing file
    cached = _INDEXES.get(folder)
    if key and cached is not None and cached[0] == key:
        return cached[1]
    manifest, spec = read_manifest(folder), read_preprocess(folder)
    index = StoreIndex(folder, str(spec["version"]), tuple(int(s) for s in spec["shape"]), {
        str(scan): (str(volume), str(sha), str(version)) for scan, volume, sha, version in
        manifest[["scan_id", "volume", "volume_sha256", "preprocess_version"]].itertuples(index=False)})
    with _INDEXES_LOCK:
        if folder not in _INDEXES and len(_INDEXES) >= _MAX_INDEXES:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[folder] = (key, index)
    return index


# ------------------------------------------------------------------------------------------------- resume
# What resuming needs from an earlier run's row. Every journal row has the first seven (a line without them is
# damage); a manifest or journal row of an older layout (without the crop columns, say) is not reused: its
# volume is made again, with a note.
JOURNAL_COLUMNS = ("scan_id", "volume", "preprocess_version", "volume_sha256", "content_sha256", "affine",
                   "spacing_mm")
RESUME_COLUMNS = (*JOURNAL_COLUMNS, *CROP_COLUMNS)


def _manifest_rows(path: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of an earlier run's manifest for resuming. An unreadable file is an InputError naming it (it is never
    ignored: a store whose manifest cannot be read is not one ingest may quietly overwrite)."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: the store's manifest is not a readable parquet file ({exc}); move it aside or "
                         "delete the store to ingest again from scratch") from None
    missing = [c for c in RESUME_COLUMNS if c not in frame.columns]
    if missing:
        warn(f"{path}: an older layout without {missing}; its volumes are converted again")
        return []
    return frame.to_dict("records")


def _journal_rows(path: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of an interrupted run's journal. Only the LAST line may be malformed, and only when it is torn (no
    final newline: the process died while writing it); it is dropped with a warning. Any other malformed line is
    an InputError naming the file and the line."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # "" when the file ends with a newline (every row complete)
    rows = []
    for number, line in enumerate(lines, start=1):
        row = _journal_row(line)
        if row is None:
            raise InputError(f"{path}: line {number} is not a journal row ({line[:60]!r}); the journal is "
                             "damaged: delete it to convert the unfinished volumes again")
        rows.append(row)
    if torn:
        row = _journal_row(torn)
        if row is None:
            warn(f"{path}: dropped a torn last line (line {len(lines) + 1}, cut short by an interrupted run); "
                 "that volume is converted again")
        else:
            rows.append(row)
    older = [row for row in rows if any(c not in row for c in RESUME_COLUMNS)]
    if older:
        missing = sorted({c for row in older for c in RESUME_COLUMNS if c not in row})
        warn(f"{path}: {len(older)} row(s) of an older layout without {missing}; their volumes are converted again")
    return [row for row in rows if all(c in row for c in RESUME_COLUMNS)]


def _journal_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and all(c in row for c in JOURNAL_COLUMNS) else None


def converted_rows(store: Path, version: str, tables: Path | None = None,
                   warn: Callable[[str], None] = warnings.warn) -> dict[str, dict[str, Any]]:
    """Volume facts (affine as 16 floats, spacing_mm, volume_sha256, content_sha256, crop_mm) of volumes converted
    with preprocess `version` whose .npy still exists, from the manifest and the journal of an interrupted run.
    `tables` is where the manifest and journal live (a shard's folder), `store` where the volumes are; `warn`
    receives the notes (an older manifest layout, a torn last journal line). InputError for an unreadable
    manifest or a malformed journal line other than a torn last one."""
    tables = tables or store
    rows: dict[str, dict[str, Any]] = {}
    if (tables / MANIFEST).is_file():
        for row in _manifest_rows(tables / MANIFEST, warn):
            rows[row["scan_id"]] = row
    journal = tables / JOURNAL
    if journal.is_file():
        for row in _journal_rows(journal, warn):
            rows[row["scan_id"]] = row
    facts = {}
    for scan_id, row in rows.items():
        path = store / str(row.get("volume", ""))
        # the hash check catches a file rewritten by a later, interrupted run with another recipe
        if row.get("preprocess_version") != version or not row.get("content_sha256") or not path.is_file():
            continue
        if file_sha256(path) == row["volume_sha256"]:
            spacing = row["spacing_mm"]
            facts[scan_id] = {
                "affine": [float(v) for v in json.loads(row["affine"])],
                "spacing_mm": None if spacing is None or spacing != spacing else float(spacing),  # NaN: stretch
                "volume_sha256": row["volume_sha256"],
                "content_sha256": row["content_sha256"],
                "crop_mm": [float(row[column]) for column in CROP_COLUMNS],
                "pixel_fix": str(row.get("pixel_fix") or ""),  # absent in older layouts: nothing was corrected
            }
    return facts


class Journal:
    """Append-only JSON-lines record of finished manifest rows (flushed per row) for resuming.

    Used as a context manager: closed on exit, kept on disk (an interrupted run resumes from it);
    `remove()` once the manifest holds the rows.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / JOURNAL

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")  # noqa: SIM115 (closed in __exit__)
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def append(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def remove_orphan_volumes(store: Path, keep: set[str]) -> int:
    """Delete `volumes/ser_*.npy` and `nifti/ser_*.nii.gz` not named in `keep` (left by an earlier run of other
    data or another key, or a duplicate), and temp files of killed writers."""
    removed = 0
    for folder, suffix in ((store / VOLUMES, ".npy"), (store / NIFTI, ".nii.gz")):
        for path in sorted([*folder.glob(f"ser_*{suffix}"), *folder.glob(f".ser_*.tmp{suffix}")]):
            if path.name.startswith(".") or path.name[: -len(suffix)] not in keep:
                path.unlink()
                removed += 1
    return removed


def remove_volume(store: Path, scan_id: str) -> None:
    """Delete one scan's volume and NIfTI export (a duplicate found after conversion)."""
    (store / volume_relpath(scan_id)).unlink(missing_ok=True)
    (store / nifti_relpath(scan_id)).unlink(missing_ok=True)
