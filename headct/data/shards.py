"""Sharded ingest for job arrays (`--shard K/N`) and `headct ingest merge`.

Partition: a study belongs to shard K of N when int(<hex of its study pseudonym>) % N == K - 1, so the split is
deterministic, balanced, and needs no coordination; every series of a study, hence every selection decision,
stays in one shard. Every shard reads all headers (cheap: no pixels) and converts only its studies.
Layout: shards write into one store (a shared folder), volumes in DEST/volumes/ as usual, tables in
DEST/shards/<K>of<N>/ (manifest.parquet, rejects.csv, labels.csv, shard.json) and the linkage file beside the
store's own as `<name>.shard-<K>of<N>.csv`. Shards do not remove other volumes and do not deduplicate:
`merge` applies the store-wide duplicate rule (headct.data.dedup) to the union, so a merged store equals an
unsharded run. Stores written on separate machines can be merged too: their volumes are copied in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from headct.data import dedup, store
from headct.data.identity import read_linkage, write_linkage
from headct.errors import InputError
from headct.io import atomic_path, file_sha256, write_json

SHARDS = "shards"
SHARD_INFO = "shard.json"


@dataclass(frozen=True)
class Shard:
    k: int  # 1-based
    n: int

    @property
    def name(self) -> str:
        return f"{self.k}of{self.n}"

    def holds(self, study_id: str) -> bool:
        """Whether the study (by its `stu_<hex>` pseudonym) belongs to this shard."""
        return int(study_id.split("_", 1)[1], 16) % self.n == self.k - 1


def parse(text: str | None) -> Shard | None:
    if text is None:
        return None
    k, n = (int(part) for part in text.split("/"))
    return Shard(k, n)


def folder(dest: Path, shard: Shard) -> Path:
    return dest / SHARDS / shard.name


def linkage_file(linkage: Path, shard: Shard) -> Path:
    return linkage.with_name(f"{linkage.stem}.shard-{shard.name}{linkage.suffix}")


def write_info(dest: Path, shard: Shard, preprocess: dict[str, Any], summary: dict[str, Any]) -> None:
    write_json(folder(dest, shard) / SHARD_INFO,
               {"k": shard.k, "n": shard.n, "preprocess": preprocess, "summary": summary})


def _shard_folders(stores: list[Path]) -> list[tuple[Path, Path, dict[str, Any]]]:
    """(store, shard folder, shard.json) for every finished shard under the given stores."""
    found = []
    for dest in stores:
        if not dest.is_dir():
            raise InputError(f"{dest}: not a folder (ingest merge expects store folders written with --shard)")
        for path in sorted((dest / SHARDS).glob("*of*")):
            info_path = path / SHARD_INFO
            if not info_path.is_file():
                raise InputError(f"{path}: no {SHARD_INFO}; that shard did not finish (run it again)")
            found.append((dest, path, json.loads(info_path.read_text())))
    if not found:
        raise InputError(f"no shard folders ({SHARDS}/<K>of<N>/) under {', '.join(map(str, stores))}")
    return found


def _check_complete(found: list[tuple[Path, Path, dict[str, Any]]]) -> dict[str, Any]:
    counts = {info["n"] for _, _, info in found}
    if len(counts) != 1:
        raise InputError(f"shards of different partitions (N = {sorted(counts)}); merge the shards of one run")
    versions = {info["preprocess"]["version"] for _, _, info in found}
    if len(versions) != 1:
        raise InputError(f"shards made with different preprocessing versions {sorted(versions)}; re-run them alike")
    n = counts.pop()
    missing = sorted(set(range(1, n + 1)) - {info["k"] for _, _, info in found})
    if missing:
        raise InputError(f"shard(s) {', '.join(f'{k}/{n}' for k in missing)} missing; run them before merging")
    return found[0][2]["preprocess"]


def _copy_in(out: Path, source: Path, relpath: str, sha256: str | None) -> None:
    """Copy one file of another store into `out` (atomically), unless the same bytes are already there."""
    target = out / relpath
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256):
        return
    if not (source / relpath).is_file():
        raise InputError(f"{source / relpath}: listed in a shard manifest but missing")
    with atomic_path(target, suffix=".nii.gz" if relpath.endswith(".nii.gz") else None) as tmp:
        shutil.copyfile(source / relpath, tmp)
    if sha256 is not None and file_sha256(target) != sha256:
        target.unlink()
        raise InputError(f"{source / relpath}: content differs from its manifest row (volume_sha256)")


def merge(stores: list[Path], linkage: Path) -> dict[str, Any]:
    """Join the shards under `stores` into the store `stores[0]`; returns the summary counts.

    Errors (InputError, nothing written): shards missing or of different runs; the same scan in two shards with
    different volumes (conflicting duplicates).
    """
    out = stores[0]
    found = _shard_folders(stores)
    preprocess = _check_complete(found)
    rows: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    rejects, labels = [], []
    for dest, path, _ in found:
        for row in store.read_manifest(path).to_dict("records"):
            seen = rows.get(row["scan_id"])
            if seen is not None and seen["volume_sha256"] != row["volume_sha256"]:
                raise InputError(f"conflicting duplicates: {row['scan_id']} is in two shards with different volumes "
                                 f"({origin[row['scan_id']]} and {path}); re-run one of them")
            rows[row["scan_id"]], origin[row["scan_id"]] = row, path
            if dest != out:
                _copy_in(out, dest, row["volume"], row["volume_sha256"])
                if (dest / store.nifti_relpath(row["scan_id"])).is_file():
                    _copy_in(out, dest, store.nifti_relpath(row["scan_id"]), None)
        rejects.append(pd.read_csv(path / store.REJECTS, dtype=str, keep_default_na=False))
        labels.append(pd.read_csv(path / store.LABELS, dtype=str, keep_default_na=False))
    duplicates = dedup.find_duplicates(rows.values())
    manifest = [row for scan_id, row in rows.items() if scan_id not in duplicates]
    manifest.sort(key=lambda r: (r["patient_id"], r["study_id"], r["scan_id"]))
    reject_rows = pd.concat(rejects).drop_duplicates("series_id").to_dict("records")
    reject_rows += [{"series_id": scan_id, "study_id": rows[scan_id]["study_id"], "reason": "duplicate",
                     "message": dedup.message(kept, what)} for scan_id, (kept, what) in duplicates.items()]
    reject_rows.sort(key=lambda r: (r["study_id"], r["series_id"]))
    label_frame = pd.concat(labels).drop_duplicates("scan_id").set_index("scan_id")
    label_frame = label_frame.reindex([r["scan_id"] for r in manifest]).reset_index()

    store.write_manifest(out, manifest)
    store.write_rejects(out, reject_rows)
    with atomic_path(out / store.LABELS) as tmp:
        label_frame.to_csv(tmp, index=False)
    write_json(out / store.PREPROCESS, preprocess)
    for scan_id in duplicates:
        store.remove_volume(out, scan_id)
    orphans = store.remove_orphan_volumes(out, {row["scan_id"] for row in manifest})
    linkage_rows = _merge_linkage(linkage, found, duplicates)

    shard_sums: dict[str, int] = {}
    for _, _, info in found:
        for key in ("studies_seen", "series_seen"):
            shard_sums[key] = shard_sums.get(key, 0) + int(info["summary"].get(key, 0))
    reasons: dict[str, int] = {}
    for row in reject_rows:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return {**shard_sums, "accepted": len(manifest), "rejected": dict(sorted(reasons.items())),
            "shards": len(found), "duplicates_across_shards": len(duplicates), "orphan_volumes_removed": orphans,
            "linkage_rows": linkage_rows, "preprocess_version": preprocess["version"]}


def _merge_linkage(linkage: Path, found: list[tuple[Path, Path, dict[str, Any]]],
                   duplicates: dict[str, tuple[str, str]]) -> int:
    """Concatenate the shards' linkage files (where this machine has them) into the store's linkage file."""
    frames = []
    for _, _, info in found:
        path = linkage_file(linkage, Shard(info["k"], info["n"]))
        frame = read_linkage(path) if path.is_file() else None
        if frame is not None and len(frame.columns):  # a shard that got no study wrote an empty file
            frames.append(frame)
    if not frames:
        return 0
    frame = pd.concat(frames).drop_duplicates("scan_id")
    frame.loc[frame["scan_id"].isin(list(duplicates)), "status"] = "duplicate"
    write_linkage(linkage, frame)
    return len(frame)
