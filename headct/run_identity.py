"""What identifies a run's trajectory, and the short key derived from it.

A run's *identity* is every setting that changes what it computes plus the content of its inputs; its *key* (12
hex digits of the identity's SHA-256) names its checkpoint folder (`pretrain`, `finetune`) or its Optuna study
(`tune`). Changing a setting that alters training therefore starts a new run, as `dvc repro` after a params change
expects, while an interrupted run resumes under the same key; a checkpoint records the identity, and a mismatch
is refused naming the settings that differ (`headct.train.checkpoint.load_for_resume`).

Settings that cannot change a trajectory (output folders, logging and checkpoint cadence, devices, worker
counts, ...) are marked where they are declared, on the pydantic models in headct/config.py:
`Field(..., json_schema_extra={"trajectory": False})`, so no job keeps its own list of exclusions.
Imports only pydantic and the standard library (plus headct.io for file hashes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = "trajectory"


def changes_trajectory(field: FieldInfo) -> bool:
    """False only for a field declared with json_schema_extra={"trajectory": False}."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get(MARKER) is False)


def trajectory_params(cfg: BaseModel) -> dict[str, Any]:
    """The settings of `cfg` that change a run's trajectory, JSON-ready (as `dump_params` writes them), nested
    sections filtered by their own markers."""
    dumped = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, field in type(cfg).model_fields.items():
        if not changes_trajectory(field):
            continue
        value = getattr(cfg, name)
        out[name] = trajectory_params(value) if isinstance(value, BaseModel) else dumped[name]
    return out


def inputs_sha256(paths: Iterable[Path]) -> dict[str, str]:
    """File name -> SHA-256 of its bytes, for the input files that exist (weights, split files)."""
    from headct.io import file_sha256

    return {Path(p).name: file_sha256(Path(p)) for p in paths if Path(p).is_file()}


def run_key(identity: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the identity's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
