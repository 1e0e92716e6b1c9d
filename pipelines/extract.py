"""Job `headct extract`: embed every scan of the split files once, into the feature cache the evaluations read.

Models: `pretrained` (the model directory's encoder), `random_init` (the same architecture from a seeded random
init, the baseline twin; `random_init.s<seed>` for each other seed of `extract.random_init_seeds`), `hu_histogram`
(per-volume HU histogram, the non-learned baseline) and every external encoder named in `extract.external`
(protocol: headct/eval/external.py, docs/contracts.md). Each ViT arm is run once per volume and pooled every way of
`extract.pools` x `extract.blocks` (one cached model per variant, see headct/eval/feature_cache.py); a
masked-restoration (mim) model directory gives the small CNN's pools and the `residual` read-out instead.
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
from headct.errors import InputError


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
) -> tuple[dict[str, tuple[np.ndarray, dict]], dict[str, float]]:
    """pretrained and (optionally) the random-init arms, each embedded once and pooled every configured way:
    ({variant name: (embeddings, provenance)}, {arm: seconds}); shape checked per volume."""
    import torch

    from headct.data.volumes import check_preprocessing
    from headct.device import resolve_device
    from headct.eval.feature_cache import random_init_arm, variant_name
    from headct.eval.features import RESIDUAL, extract_restoration_variants, extract_variants
    from headct.io import file_sha256
    from headct.models.model_dir import (
        CONFIG,
        RESTORATION_HEAD,
        WEIGHTS,
        build_model_encoder,
        load_model_dir,
        load_restoration,
        restoration_mask_ratio,
    )
    from headct.models.restoration import MaskedRestoration

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
    pools = cfg.pools or (cfg.pool,)
    # A masked-restoration (mim) directory: the small CNN and its restoration head, read at one depth (`blocks`
    # does not apply); its random-init twins are built as pre-training built its start (seed, encoder, head).
    restoration = config["arch"].get("name") == "cnn" and config.get("method") == "mim"
    if RESIDUAL in pools and not restoration:
        raise InputError(f"extract.pools: {RESIDUAL!r} needs a masked-restoration (pretrain.method mim) model "
                         f"directory; {cfg.model_dir / CONFIG} is method {config.get('method')!r}")
    if restoration:
        encoder = load_restoration(cfg.model_dir, encoder, config)
        meta["restoration_head_sha256"] = file_sha256(cfg.model_dir / RESTORATION_HEAD)

    def twin() -> Any:
        built = build_model_encoder(config["arch"])
        return MaskedRestoration(built, restoration_mask_ratio(cfg.model_dir, config)) if restoration else built

    # arm -> (encoder, the default variant's provenance, init seed)
    arms: dict[str, tuple[Any, dict, int | None]] = {"pretrained": (encoder, {**meta, "kind": "encoder"}, None)}
    if cfg.random_init:
        for seed in cfg.random_init_seeds or (cfg.seed,):
            torch.manual_seed(seed)
            arms[random_init_arm(seed, cfg.seed)] = (twin(), {**meta, "kind": "random_init", "seed": seed}, seed)
    depth = 1 if restoration else len(encoder.blocks)
    blocks = (-1,) if restoration else cfg.blocks
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad or len({b % depth for b in blocks}) != len(blocks):
        raise InputError(
            f"{cfg.model_dir / CONFIG}: extract.blocks {list(cfg.blocks)} must be distinct blocks of this "
            f"{depth}-block encoder (valid indices: -{depth} .. {depth - 1})"
        )
    device = resolve_device(cfg.device)
    out: dict[str, tuple[np.ndarray, dict]] = {}
    seconds: dict[str, float] = {}
    for arm, (model, arm_meta, init_seed) in arms.items():
        start = time.perf_counter()
        if restoration:
            variants = extract_restoration_variants(model, paths, config["windows"], pools=pools,
                                                    batch_size=cfg.batch_size, device=device,
                                                    shape=preprocess.get("shape"), description=arm)
        else:
            variants = extract_variants(model, paths, config["windows"], pools=pools, blocks=cfg.blocks,
                                        batch_size=cfg.batch_size, device=device, shape=preprocess.get("shape"),
                                        description=arm)
        model.to("cpu")
        seconds[arm] = time.perf_counter() - start
        for (pool, block), embedding in variants.items():
            default = pool == cfg.pool and block % depth == depth - 1  # named as the arm
            variant_meta = {**arm_meta, "pool": pool}
            if not default:  # the default variant's .json stays as it always was
                variant_meta.update(arm=arm, block=block, init_seed=init_seed)
            out[variant_name(arm, pool, block, default)] = (embedding, variant_meta)
    return out, seconds


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
        variants, arm_seconds = _encoder_models(cfg, ctx, paths)
        results.update(variants)
        seconds.update(arm_seconds)
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
    for name, (embedding, meta) in results.items():  # a variant shares its arm's one forward pass
        took = seconds.get(name)
        view.add_row(name, str(embedding.shape[1]), f"{took:.1f}" if took is not None else f"({meta['arm']})")
    Console().print(view)
    return {"scans": len(table), "models": {m: int(e.shape[1]) for m, (e, _) in results.items()}}
