"""What an MLflow run is called and tagged with, from the job's validated config (and, for the jobs that read an
encoder, the method and architecture its model directory's config.json records).

A run's name says what it is (`pretrain mae vit-tiny p16 64^3`, `probe mim cnn vs baselines`, `finetune ICH vit
pretrained mean-pool`); its tags name the store (a sanitised label: the folder's last name, never a path), the
model, the method and the stage (`headct.stage`, and `dvc.stage` / `dvc.exp_name` when DVC runs it). Names and
tags never hold a path, a patient, study or series id: only config values (sizes, labels, methods) and folder
labels. Imports only the standard library and pydantic.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # marks a model-training experiment; MLflow 3.17's UI still opens on GenAI
# unless the address asks for the runs (`#/experiments/<id>/runs?workflowType=machine_learning`, what `make ui` prints)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_LABEL = 40


def label(path: Path | str | None) -> str | None:
    """A folder's last name as a short, safe label (`data/store/cq500` -> `cq500`); None for no path."""
    if path is None or str(path) in ("", "."):
        return None
    name = _UNSAFE.sub("-", Path(path).name).strip("-.")
    return name[:_MAX_LABEL] or None


def encoder_label(model_dir: Path | str | None, root: Path | None = None) -> str | None:
    """What a model directory holds, from its config.json: `mim cnn`, `mae vit-tiny p8` (method, architecture);
    the folder's label when it has none (not written yet, or not a headct model directory). A relative directory
    is read under `root` (the project), never under the working directory; without a root, the label."""
    if model_dir is None:
        return None
    path = Path(model_dir)
    if not path.is_absolute():
        if root is None:
            return label(model_dir)
        path = root / path
    try:
        config = json.loads((path / "config.json").read_text())
        method, arch = config["method"], config["arch"]
        name = "cnn" if arch["name"] == "cnn" else f"vit-{arch['name']} p{arch['patch_size']}"
    except (OSError, ValueError, KeyError, TypeError):
        return label(model_dir)
    parts = [_UNSAFE.sub("-", part).strip("-.")[:_MAX_LABEL] for part in (str(method), *name.split(" "))]
    return " ".join(p for p in parts if p) or label(model_dir)


def _labels(values: list[str] | None, most: int = 3) -> str:
    if not values:
        return "all labels"
    return ",".join(values[:most]) + (f" +{len(values) - most}" if len(values) > most else "")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _store(cfg: Any, job: str) -> str | None:
    """The data set a run is about: the store it writes or reads, else the split or feature folder's label
    (named after the store in this project's layout), else the raw data set synth writes."""
    for field in ("dest", "store", "splits", "features", *(("out",) if job == "synth" else ())):
        value = _get(cfg, field)
        if value is not None:
            return label(value)
    return None


def describe(job: str, cfg: BaseModel | Any, grid: list[int] | tuple[int, ...] | None = None,
             root: Path | None = None) -> tuple[str, dict[str, str]]:
    """(run name, tags) for one job invocation; `grid` (the store's voxel grid) when the job knows it, `root` (the
    project, for relative model directories)."""
    if isinstance(cfg, Mapping):  # a config already dumped for logging (ingest withholds source paths)
        cfg = SimpleNamespace(**cfg)
    elif not isinstance(cfg, BaseModel):
        return job, {"headct.stage": job, **_dvc_tags()}
    model, method, name = None, job, job
    size = f" {grid[0]}^3" if grid and len(set(grid)) == 1 else (f" {'x'.join(map(str, grid))}" if grid else "")
    if job == "synth":
        name = f"synth {_get(cfg, 'n_patients')} patients"
        method = "synthetic"
    elif job in ("ingest", "ingest-merge", "split"):
        name = f"{job} {_store(cfg, job) or ''}".strip()
    elif job == "pretrain":
        model = "cnn" if cfg.arch == "cnn" else f"vit-{cfg.arch}-p{cfg.patch_size}"
        method = cfg.method
        name = f"pretrain {cfg.method} {model.replace('-p', ' p')}{size}"
    elif job == "extract":
        model = encoder_label(_get(cfg, "model_dir"), root) or "baselines only"
        name = f"extract {model} features"
    elif job == "probe":
        model = encoder_label(cfg.model_dir, root)
        method = "linear-probe"
        name = f"probe {model} vs baselines"
    elif job == "fewshot":
        method = "few-shot"
        name = f"fewshot K={','.join(map(str, cfg.shots))} x {cfg.seeds} seeds"
    elif job == "retrieval":
        name = f"retrieval {cfg.split}"
    elif job == "compare":
        name = f"compare {cfg.model} vs random init"
    elif job == "tune":
        method = "optuna-tpe"
        name = f"tune finetune lr x {cfg.n_trials} trials"
    elif job == "finetune":
        model = cfg.arch if cfg.arch != "vit" else f"vit {cfg.init}"
        method = "finetune"
        name = f"finetune {_labels(cfg.labels)} {model} {cfg.pool}-pool"
    elif job == "explain":
        model = encoder_label(cfg.model_dir, root)
        name = f"explain {cfg.split}"
    tags = {"headct.stage": job, "headct.method": method, **_dvc_tags()}
    store = _store(cfg, job)
    if store:
        tags["headct.store"] = store
    if model:
        tags["headct.model"] = model
    return name, tags


def _dvc_tags() -> dict[str, str]:
    """The DVC stage (DVC sets DVC_STAGE for every stage command) and experiment name (`dvc exp run`)."""
    out = {}
    for tag, env in (("dvc.stage", "DVC_STAGE"), ("dvc.exp_name", "DVC_EXP_NAME")):
        value = os.environ.get(env)
        if value:
            out[tag] = _UNSAFE.sub("-", value)[:80]
    return out
