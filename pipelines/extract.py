"""Job `headct extract`: embed every scan of the split files once, into the feature cache the evaluations read.

Models: `pretrained` (the model directory's encoder), `random_init` (the same architecture from a seeded random
init, the baseline twin), `hu_histogram` (per-volume HU histogram, the non-learned baseline) and every external
encoder named in `extract.external` (protocol: headct/eval/external.py, docs/contracts.md).
Outputs under cfg.out: `<model>.npz` + `<model>.json` per model, then `index.json` (see headct/eval/feature_cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from headct.config.base import JobContext
from headct.config.evaluate import ExtractConfig


def _scan_table(cfg: ExtractConfig) -> Any:
    import pandas as pd

    from headct.data.splits import read_splits

    frames = read_splits(cfg.splits)
    return pd.concat(
        [f[["img_path", "scan_id", "patient_id"]].assign(split=name) for name, f in frames.items()],
        ignore_index=True,
    )


def _encoder_models(
    cfg: ExtractConfig, ctx: JobContext, paths: list[Path]
) -> dict[str, tuple[np.ndarray, dict, float]]:
    """pretrained and (optionally) random_init: (embeddings, provenance, seconds); shape checked per volume."""
    import torch

    from headct.data.volumes import check_preprocessing
    from headct.device import resolve_device
    from headct.eval.features import extract_features
    from headct.io import file_sha256
    from headct.models.model_dir import CONFIG, WEIGHTS, load_model_dir
    from headct.models.vit import build_encoder

    assert cfg.model_dir is not None
    encoder, config = load_model_dir(cfg.model_dir)
    check_preprocessing(cfg.splits, ctx.root, config, cfg.model_dir / CONFIG,
                        allow_mismatch=cfg.allow_preprocess_mismatch, setting="extract.allow_preprocess_mismatch")
    preprocess = config.get("preprocess", {})
    meta = {
        "source": str(
            cfg.model_dir.relative_to(ctx.root) if cfg.model_dir.is_relative_to(ctx.root) else cfg.model_dir
        ),
        "weights_sha256": file_sha256(cfg.model_dir / WEIGHTS),
        "method": config.get("method"),
        "pool": cfg.pool,
        "preprocess_version": preprocess.get("version"),
        "windows": config["windows"],
    }
    encoders = {"pretrained": (encoder, {**meta, "kind": "encoder"})}
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        encoders["random_init"] = (
            build_encoder(config["arch"]),
            {**meta, "kind": "random_init", "seed": cfg.seed},
        )
    device = resolve_device(cfg.device)
    out = {}
    for name, (model, model_meta) in encoders.items():
        start = time.perf_counter()
        embedding = extract_features(
            model,
            paths,
            config["windows"],
            pool=cfg.pool,
            batch_size=cfg.batch_size,
            device=device,
            shape=preprocess.get("shape"),
            description=name,
        )
        model.to("cpu")
        out[name] = (embedding, model_meta, time.perf_counter() - start)
    return out


def _volume_models(cfg: ExtractConfig, shape: Any, root: Path) -> dict[str, tuple[Callable, Any, dict]]:
    """name -> (batch function on int16 HU, expected grid, provenance) for the histogram and external encoders."""
    from headct.data.volumes import check_preprocessing
    from headct.eval.external import checked_embed, load_external
    from headct.eval.histogram import hu_histogram

    models: dict[str, tuple[Callable, Any, dict]] = {}
    if cfg.hu_histogram:
        models["hu_histogram"] = (
            lambda hu: hu_histogram(hu, cfg.histogram_bins),
            shape,
            {"kind": "hu_histogram", "bins": cfg.histogram_bins, "fine_range_hu": [-100, 200]},
        )
    for name, spec in cfg.external.items():
        encoder = load_external(spec)
        check_preprocessing(cfg.splits, root, {"preprocess": dict(encoder.preprocess)}, f"external encoder {spec}",
                            allow_mismatch=cfg.allow_preprocess_mismatch, setting="extract.allow_preprocess_mismatch")

        def embed(hu: np.ndarray, encoder: Any = encoder, spec: str = spec) -> np.ndarray:
            return checked_embed(encoder, hu, spec)

        meta = {
            "kind": "external",
            "source": spec,
            "preprocess": dict(encoder.preprocess),
            "preprocess_version": encoder.preprocess.get("version"),
        }
        models[name] = (embed, encoder.preprocess["shape"], meta)
    return models


def run(cfg: ExtractConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.eval.feature_cache import FeatureSet, write_feature_set, write_index
    from headct.eval.features import map_volumes
    from headct.models.model_dir import read_config

    table = _scan_table(cfg)
    paths = [ctx.root / p for p in table["img_path"]]
    results: dict[str, tuple[np.ndarray, dict]] = {}
    seconds: dict[str, float] = {}
    shape = None
    if cfg.model_dir is not None:
        shape = read_config(cfg.model_dir).get("preprocess", {}).get("shape")
        for name, (embedding, meta, took) in _encoder_models(cfg, ctx, paths).items():
            results[name], seconds[name] = (embedding, meta), took
    for name, (fn, grid, meta) in _volume_models(cfg, shape, ctx.root).items():
        start = time.perf_counter()
        results[name] = (
            map_volumes(fn, paths, batch_size=cfg.batch_size, shape=grid, description=name),
            meta,
        )
        seconds[name] = time.perf_counter() - start

    written: list[Path] = []
    for name, (embedding, meta) in results.items():
        fs = FeatureSet(
            name,
            table["scan_id"].to_numpy(str),
            table["patient_id"].to_numpy(str),
            table["split"].to_numpy(str),
            embedding,
            meta,
        )
        written += write_feature_set(cfg.out, fs)
    written.append(write_index(cfg.out, list(results)))

    with tracking.job_run(ctx.tracking, "extract", cfg, ctx.root) as mlrun:
        mlrun.log_metrics({"scans": len(table), **{f"seconds.{m}": s for m, s in seconds.items()}})
        mlrun.log_artifact(cfg.out / "index.json", "extract")
        for name in results:
            mlrun.log_artifact(cfg.out / f"{name}.json", "extract")

    view = Table(title=f"features: {len(table)} scans -> {cfg.out}")
    for column in ("model", "dim", "seconds"):
        view.add_column(column, justify="left" if column == "model" else "right")
    for name, (embedding, _) in results.items():
        view.add_row(name, str(embedding.shape[1]), f"{seconds[name]:.1f}")
    Console().print(view)
    return {"scans": len(table), "models": {m: int(e.shape[1]) for m, (e, _) in results.items()}}
