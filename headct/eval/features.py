"""Frozen-model outputs over canonical int16 HU volumes: one embedding vector per scan (encoders) or one
probability per label (a classifier, `score_volumes`).

Volumes are read through the store-checked `headct.data.volumes.load_volume`, one batch ahead on a worker thread
(numpy file reads and hashing release the GIL), windowed into channels on the compute device (`hu_to_windows`, as
in pre-training) and pooled by the encoder.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _load_batch(paths: Sequence[Path], shape: Sequence[int] | None) -> np.ndarray:
    from headct.data.volumes import load_volume

    return np.stack([load_volume(p, shape=shape) for p in paths])


def map_volumes(
    fn: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[Path],
    *,
    batch_size: int = 16,
    shape: Sequence[int] | None = None,
    description: str = "features",
) -> np.ndarray:
    """Apply `fn` to batches of volumes read from disk one batch ahead on a worker thread.

    Args:
        fn: (B, X, Y, Z) int16 HU numpy batch -> (B, D) features (numpy, any float dtype).
        paths: canonical store volumes (`<store>/volumes/<scan_id>.npy`), read through `load_volume`; `shape`:
            the grid the caller's model expects (checked per file beside the store's own grid).
    Returns:
        (N, D) float32, in the order of `paths`; (0, 0) when `paths` is empty.
    """
    from rich.progress import Progress

    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    out: list[np.ndarray] = []
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader,
        Progress(transient=True) as progress,
    ):
        task = progress.add_task(description, total=len(paths))
        pending = reader.submit(_load_batch, batches[0], shape) if batches else None
        for index in range(len(batches)):
            hu = pending.result()  # type: ignore[union-attr]
            if index + 1 < len(batches):
                pending = reader.submit(_load_batch, batches[index + 1], shape)
            out.append(np.asarray(fn(hu), dtype=np.float32))
            progress.advance(task, len(hu))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def extract_features(
    encoder: Any,
    paths: Sequence[Path],
    windows: Sequence[Any],
    *,
    pool: str = "mean",
    batch_size: int = 16,
    device: Any = "cpu",
    shape: Sequence[int] | None = None,
    description: str = "features",
) -> np.ndarray:
    """Embed every volume with a frozen encoder.

    Args:
        encoder: module with `forward_pooled(x: (B, C, X, Y, Z) float, pool) -> (B, D)`; put in eval mode here.
        paths: `.npy` files, int16 HU volumes (X, Y, Z).
        windows: HU windows, one input channel each (passed to `hu_to_windows`).
        shape: expected volume shape in voxels (the model's preprocessing grid), checked per file.
    Returns:
        (N, D) float32 features, in the order of `paths`.
    """
    import torch

    from headct.data.windows import hu_to_windows

    encoder.eval()
    encoder.to(device)

    def embed(hu: np.ndarray) -> np.ndarray:
        x = hu_to_windows(torch.from_numpy(hu).to(device, non_blocking=True), windows)
        return encoder.forward_pooled(x, pool=pool).float().cpu().numpy()

    if not paths:
        return np.zeros((0, int(getattr(encoder, "embed_dim", 0))), dtype=np.float32)
    with torch.inference_mode():
        return map_volumes(embed, paths, batch_size=batch_size, shape=shape, description=description)


POOLS: tuple[str, ...] = ("cls", "mean", "max", "meanmax")  # config: headct.config.evaluate.Pool
RESIDUAL = "residual"  # the masked-restoration read-out (headct/models/restoration.py), mim models only


def pool_tokens(patches: Any, cls: Any, pool: str) -> Any:
    """One vector per scan from (B, N, D) patch tokens and the (B, D) CLS token: "cls", "mean", "max" (per
    channel over the patches) or "meanmax" (mean then max, (B, 2D))."""
    import torch

    if pool == "cls":
        return cls
    if pool == "mean":
        return patches.mean(dim=1)
    if pool == "max":
        return patches.amax(dim=1)
    if pool == "meanmax":
        return torch.cat([patches.mean(dim=1), patches.amax(dim=1)], dim=1)
    raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")


def extract_variants(
    encoder: Any,
    paths: Sequence[Path],
    windows: Sequence[Any],
    *,
    pools: Sequence[str],
    blocks: Sequence[int],
    batch_size: int = 16,
    device: Any = "cpu",
    shape: Sequence[int] | None = None,
    description: str = "features",
) -> dict[tuple[str, int], np.ndarray]:
    """Every (pool, block) embedding of a frozen ViT3D from ONE forward pass per batch.

    Args:
        encoder: a ViT3D (`forward_intermediates`, `blocks`); put in eval mode here.
        pools: names of `POOLS`; blocks: block indices as given (negative count from the end).
        Tokens of a block pass through the final LayerNorm (`forward_intermediates(norm=True)`), so block -1 with
        pool "mean" or "cls" equals `forward_pooled` bit for bit; blocks after the deepest one asked are not run.
    Returns:
        {(pool, block): (N, D') float32} in the order of `paths`, keys as given (D' = 2D for "meanmax").
    """
    import torch

    from headct.data.windows import hu_to_windows

    depth = len(encoder.blocks)
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad:
        raise ValueError(f"block(s) {bad} out of range for this {depth}-block encoder (valid: -{depth} .. {depth - 1})")
    if len({b % depth for b in blocks}) != len(blocks):
        raise ValueError(f"blocks {list(blocks)} name the same block twice in a {depth}-block encoder")
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise ValueError(f"unknown pool(s) {unknown}; choose from {list(POOLS)}")
    take = sorted({b % depth for b in blocks})  # the order forward_intermediates returns them in
    keys = [(pool, block) for pool in pools for block in blocks]
    dims = [encoder.embed_dim * (2 if pool == "meanmax" else 1) for pool, _ in keys]
    encoder.eval()
    encoder.to(device)

    def embed(hu: np.ndarray) -> np.ndarray:
        x = hu_to_windows(torch.from_numpy(hu).to(device, non_blocking=True), windows)
        out = encoder.forward_intermediates(
            x, indices=take, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        parts = []
        for pool, block in keys:
            patches, prefix = out[take.index(block % depth)]
            parts.append(pool_tokens(patches, prefix[:, 0], pool).float().cpu().numpy())
        return np.concatenate(parts, axis=1)

    if not paths:
        return {key: np.zeros((0, dim), dtype=np.float32) for key, dim in zip(keys, dims, strict=True)}
    with torch.inference_mode():
        flat = map_volumes(embed, paths, batch_size=batch_size, shape=shape, description=description)
    edges = np.cumsum([0, *dims])
    return {key: np.ascontiguousarray(flat[:, a:b]) for key, a, b in zip(keys, edges[:-1], edges[1:], strict=True)}


def extract_restoration_variants(
    model: Any,
    paths: Sequence[Path],
    windows: Sequence[Any],
    *,
    pools: Sequence[str],
    batch_size: int = 16,
    device: Any = "cpu",
    shape: Sequence[int] | None = None,
    description: str = "features",
) -> dict[tuple[str, int], np.ndarray]:
    """Every pool of a frozen masked-restoration model (`headct.models.restoration.MaskedRestoration`) from one
    pass per batch: the small CNN's tokens pooled as `pool_tokens` does ("cls" = the global max of its last map),
    and "residual" = `MaskedRestoration.residual_features`. Keys (pool, -1): the CNN has one read-out depth."""
    import torch

    from headct.data.windows import hu_to_windows
    from headct.models.restoration import RESIDUAL_DIM

    unknown = [p for p in pools if p not in (*POOLS, RESIDUAL)]
    if unknown:
        raise ValueError(f"unknown pool(s) {unknown}; choose from {[*POOLS, RESIDUAL]}")
    width = model.encoder.embed_dim
    dims = [RESIDUAL_DIM if p == RESIDUAL else width * (2 if p == "meanmax" else 1) for p in pools]
    model.eval()
    model.to(device)

    def embed(hu: np.ndarray) -> np.ndarray:
        x = hu_to_windows(torch.from_numpy(hu).to(device, non_blocking=True), windows)
        tokens = model.encoder.forward_features(x)
        parts = [model.residual_features(x) if pool == RESIDUAL else pool_tokens(tokens[:, 1:], tokens[:, 0], pool)
                 for pool in pools]
        return np.concatenate([t.float().cpu().numpy() for t in parts], axis=1)

    keys = [(pool, -1) for pool in pools]
    if not paths:
        return {key: np.zeros((0, dim), dtype=np.float32) for key, dim in zip(keys, dims, strict=True)}
    with torch.inference_mode():
        flat = map_volumes(embed, paths, batch_size=batch_size, shape=shape, description=description)
    edges = np.cumsum([0, *dims])
    return {key: np.ascontiguousarray(flat[:, a:b]) for key, a, b in zip(keys, edges[:-1], edges[1:], strict=True)}


def score_volumes(
    classifier: Any, paths: Sequence[Path], windows: Sequence[Any] | None = None, batch_size: int = 16,
    shape: Sequence[int] | None = None, description: str = "scoring",
) -> np.ndarray:
    """(n, L) float64 sigmoid probabilities of a classifier (on its own device) for the store volumes `paths`, in
    eval mode without augmentation: `headct.models.classifier_dir.predict_proba` over `map_volumes` batches (its
    float32 probabilities are exact in float32, so the cast loses nothing); (0, 0) when `paths` is empty."""
    from headct.models.classifier_dir import predict_proba

    return map_volumes(lambda hu: predict_proba(classifier, hu, windows), paths, batch_size=batch_size,
                       shape=shape, description=description).astype(np.float64)
