"""The feature cache written by `headct extract` and read by probe, few-shot and retrieval.

Layout of a cache folder (e.g. `data/features/synth/`):
    `<model>.npz`   arrays `scan_id` (n,) str, `patient_id` (n,) str, `split` (n,) str, `embedding` (n, D) float32
    `<model>.json`  provenance: model kind, source, weights SHA-256, pool, preprocessing version, windows, D, n
    `index.json`    {"models": [...]} in the order they were extracted (the order reports list them in)
Only pseudonymous ids are stored. Every file is written atomically, the index last, so a reader never sees a
model listed whose arrays are half-written.

Variants: one ViT arm (`pretrained`, `random_init` and `random_init.s<seed>` for other init seeds) gives one cached
model per (pool, block). The arm's default variant (the `extract.pool` pool, the last block) is named as the arm
and its `.json` is as it always was; every other variant is `<arm>.<pool>.b<block>` and its `.json` records
`arm`, `pool`, `block` and `init_seed`. `variant_of` reads both back the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headct.errors import InputError
from headct.io import atomic_path, file_sha256, write_json

INDEX = "index.json"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a file name


@dataclass
class FeatureSet:
    """One model's embeddings of every scan of the split files."""

    model: str
    scan_id: np.ndarray  # (n,) str
    patient_id: np.ndarray  # (n,) str
    split: np.ndarray  # (n,) str: train / val / test
    embedding: np.ndarray  # (n, D) float32
    meta: dict[str, Any] = field(default_factory=dict)

    def for_frame(self, frame: pd.DataFrame, source: Path) -> np.ndarray:
        """(len(frame), D) embeddings aligned with the rows of a split file; a scan not cached is an InputError."""
        row = pd.Series(np.arange(len(self.scan_id)), index=self.scan_id)
        wanted = frame["scan_id"].astype(str)
        missing = ~wanted.isin(row.index)
        if missing.any():
            raise InputError(
                f"{source}: scan {wanted[missing].iloc[0]!r} of the split files is not in the cache "
                f"({int(missing.sum())} missing); re-run `headct extract`"
            )
        return self.embedding[row[wanted].to_numpy()]


def check_model_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise ValueError(f"model name {name!r} must match {MODEL_NAME.pattern} (it names the cache files)")
    return name


@dataclass(frozen=True)
class Variant:
    """Which arm a cached model belongs to and how its vectors were made (pool/block None where they do not
    apply: histogram, external encoders; init_seed None unless a random init)."""

    model: str
    arm: str
    pool: str | None = None
    block: int | None = None
    init_seed: int | None = None


def random_init_arm(seed: int, default_seed: int) -> str:
    """`random_init` for the default seed (extract.seed), `random_init.s<seed>` for any other."""
    return "random_init" if seed == default_seed else f"random_init.s{seed}"


def variant_name(arm: str, pool: str, block: int, default: bool) -> str:
    """The arm's name for its default variant, else `<arm>.<pool>.b<block>` (block as configured, e.g. b-2)."""
    return check_model_name(arm if default else f"{arm}.{pool}.b{block}")


def variant_of(features: FeatureSet) -> Variant:
    """The variant a cached model is: recorded in its .json, or implied for a default variant / older caches
    (arm = the model's name, the last block, the random init's `seed`)."""
    meta = features.meta
    if "arm" in meta:
        return Variant(features.model, meta["arm"], meta.get("pool"), meta.get("block"), meta.get("init_seed"))
    kind = meta.get("kind")
    if kind in ("encoder", "random_init"):
        seed = meta.get("seed") if kind == "random_init" else None
        return Variant(features.model, features.model, meta.get("pool"), -1, seed)
    return Variant(features.model, features.model)


def arms_of(cache: dict[str, FeatureSet]) -> dict[str, list[str]]:
    """arm -> its cached models, arms and models in cache (index) order."""
    out: dict[str, list[str]] = {}
    for name, features in cache.items():
        out.setdefault(variant_of(features).arm, []).append(name)
    return out


def write_feature_set(folder: Path, features: FeatureSet) -> list[Path]:
    """Write `<model>.npz` and `<model>.json` atomically; returns both paths (the index is written separately)."""
    check_model_name(features.model)
    n = len(features.scan_id)
    if features.embedding.ndim != 2 or len(features.embedding) != n:
        raise ValueError(f"embedding shape {features.embedding.shape} does not match {n} scans")
    npz, meta = folder / f"{features.model}.npz", folder / f"{features.model}.json"
    with atomic_path(npz) as tmp:
        np.savez(
            tmp,
            scan_id=np.asarray(features.scan_id, dtype=str),
            patient_id=np.asarray(features.patient_id, dtype=str),
            split=np.asarray(features.split, dtype=str),
            embedding=np.asarray(features.embedding, dtype=np.float32),
        )
    write_json(
        meta, {**features.meta, "model": features.model, "dim": int(features.embedding.shape[1]), "n": n}
    )
    return [npz, meta]


def write_index(folder: Path, models: list[str]) -> Path:
    write_json(folder / INDEX, {"models": list(models)})
    return folder / INDEX


def cached_models(folder: Path) -> list[str]:
    """The model names listed in `folder/index.json` (InputError naming the file when absent or unreadable)."""
    path = Path(folder) / INDEX
    try:
        return list(json.loads(path.read_text())["models"])
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; run `headct extract` first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a feature-cache index ({exc})") from None


def read_feature_set(folder: Path, model: str) -> FeatureSet:
    """Load one model's cached embeddings; InputError naming the file when missing or malformed."""
    npz, meta_path = Path(folder) / f"{model}.npz", Path(folder) / f"{model}.json"
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in ("scan_id", "patient_id", "split", "embedding")}
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{exc.filename}: file not found (model {model!r} not extracted?)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{npz}: not a readable feature file ({exc})") from None
    return FeatureSet(model, data["scan_id"], data["patient_id"], data["split"], data["embedding"], meta)


def read_cache(folder: Path, models: list[str] | None = None, root: Path | None = None) -> dict[str, FeatureSet]:
    """Every (or the named) cached model's features, in index order; an unknown name is an InputError.

    With `root` (the project root that relative `source` paths refer to), an encoder's features are checked
    against its model directory: weights changed since extraction is an InputError asking for `headct extract`,
    so a probe never reports numbers of a model that no longer exists.
    """
    listed = cached_models(folder)
    wanted = listed if models is None else list(models)
    unknown = [m for m in wanted if m not in listed]
    if unknown:
        raise InputError(f"{Path(folder) / INDEX}: model(s) {unknown} not cached; cached: {listed}")
    cache = {m: read_feature_set(folder, m) for m in wanted}
    if root is not None:
        for features in cache.values():
            check_fresh(folder, features, Path(root))
    return cache


def check_fresh(folder: Path, features: FeatureSet, root: Path) -> None:
    """InputError when an encoder's weights file no longer has the SHA-256 recorded at extraction."""
    meta = features.meta
    if meta.get("kind") != "encoder" or not meta.get("source") or not meta.get("weights_sha256"):
        return
    weights = (root / meta["source"]) / "model.safetensors"
    if weights.is_file() and file_sha256(weights) != meta["weights_sha256"]:
        raise InputError(
            f"{Path(folder) / (features.model + '.json')}: features of {meta['source']} were extracted from weights "
            f"{meta['weights_sha256'][:12]}, but {weights} now has {file_sha256(weights)[:12]}; re-run `headct extract`"
        )


def split_features(
    cache: dict[str, FeatureSet], frames: dict[str, pd.DataFrame], folder: Path
) -> dict[str, dict[str, np.ndarray]]:
    """model -> split -> (n_split, D) embeddings aligned with the split files' rows."""
    return {
        model: {split: fs.for_frame(frame, Path(folder) / f"{model}.npz") for split, frame in frames.items()}
        for model, fs in cache.items()
    }
