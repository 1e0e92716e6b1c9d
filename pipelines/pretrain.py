"""`headct pretrain`: MAE pre-training of a 3D ViT on the train (+ val) patients of a split, never test.

Recipe: read the split and the store's preprocessing spec -> hold out a fixed set of val patients for the
reconstruction check -> build encoder + MAE -> resume from a compatible checkpoint if there is one ->
masked-reconstruction loss on the held-out volumes (step 0) -> train -> the same loss with the same masks
(end) -> model directory (encoder only) + metrics.json + figures -> MLflow.

The held-out patients are excluded from pre-training even when `use_val` is true, so the start/end loss
compares the model on volumes it has never seen; the rest of val is pre-trained on when `use_val` is true.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headct.config import JobContext, PretrainConfig, dump_params
from headct.errors import InputError

EVAL_STREAM = 1_000_003  # generator stream of the held-out masks (training uses small stream numbers)
HELDOUT_STREAM = 7  # numpy stream that orders val patients for the held-out set
# Settings that do not change the training trajectory: a checkpoint may be resumed across changes to these.
NOT_IN_IDENTITY = {"splits", "model_dir", "checkpoint_dir", "report_dir", "log_every", "checkpoint_every",
                   "device", "threads", "workers"}


@dataclass
class PretrainData:
    """What pre-training reads: training and held-out volumes, the store's preprocessing spec, provenance."""

    train_paths: list[Path]
    train_ids: list[str]
    heldout_paths: list[Path]
    heldout_ids: list[str]
    preprocess: dict[str, Any]
    provenance: dict[str, Any]


def heldout_patients(val: Any, n_volumes: int, seed: int) -> list[str]:
    """Whole val patients, in a seeded order, until `n_volumes` scans are covered (a fixed set per seed)."""
    counts = val.groupby("patient_id").size().sort_index()
    order = np.random.default_rng([seed, HELDOUT_STREAM]).permutation(len(counts))
    chosen, covered = [], 0
    for i in order:
        if covered >= n_volumes:
            break
        chosen.append(str(counts.index[i]))
        covered += int(counts.iloc[i])
    return chosen


def load_data(cfg: PretrainConfig, ctx: JobContext) -> PretrainData:
    """Training and held-out volumes from the split files, and the store's preprocessing spec."""
    from headct.data.splits import path_for_files, read_split, store_of_split

    store = store_of_split(cfg.splits, ctx.root)
    if store is None:
        raise InputError(f"{cfg.splits / 'split.json'}: not found (run `headct ingest` and `headct split` first)")
    try:
        preprocess = json.loads((store / "preprocess.json").read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{exc.filename}: not found (run `headct ingest` and `headct split` first)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{store / 'preprocess.json'}: not valid JSON ({exc})") from None
    train, val = read_split(cfg.splits, "train"), read_split(cfg.splits, "val")
    if val.empty:
        raise InputError(f"{cfg.splits / 'val.csv'}: no scans; the reconstruction check needs held-out val patients")
    held = set(heldout_patients(val, cfg.eval_volumes, cfg.seed))
    heldout = val[val["patient_id"].isin(held)].sort_values("scan_id").head(cfg.eval_volumes)
    parts = [train, val[~val["patient_id"].isin(held)]] if cfg.use_val else [train]
    rows = [r for part in parts for r in part[["img_path", "scan_id", "patient_id"]].itertuples(index=False)]
    if not rows:
        raise InputError(f"{cfg.splits}: no training scans left after holding out {len(held)} val patients")
    train_ids = [r.scan_id for r in rows]
    provenance = {
        "splits": path_for_files(cfg.splits, ctx.root),
        "store": path_for_files(store, ctx.root),
        "preprocess_version": preprocess.get("version"),
        "train_scans": len(rows),
        "train_patients": len({r.patient_id for r in rows}),
        "heldout_scans": len(heldout),
        "heldout_patients": len(held),
        "val_in_training": cfg.use_val,
        "train_ids_sha256": hashlib.sha256("\n".join(train_ids).encode()).hexdigest(),
    }
    return PretrainData(
        [ctx.root / r.img_path for r in rows], train_ids,
        [ctx.root / p for p in heldout["img_path"]], list(heldout["scan_id"]), preprocess, provenance,
    )


def run_identity(cfg: PretrainConfig, data: PretrainData) -> dict[str, Any]:
    """Everything that fixes the training trajectory; a checkpoint resumes only under the same identity."""
    params = {k: v for k, v in dump_params(cfg).items() if k not in NOT_IN_IDENTITY}
    return {**params, "train_ids_sha256": data.provenance["train_ids_sha256"],
            "grid": list(data.preprocess["shape"])}


def recon_loss(mae: Any, hu: Any, cfg: PretrainConfig, device: Any) -> float:
    """Mean masked-patch MSE over held-out volumes (B, X, Y, Z) int16, no augmentation, fixed masks."""
    import torch

    from headct.data.windows import hu_to_windows
    from headct.train.engine import step_generator

    generator = step_generator(cfg.seed, 0, EVAL_STREAM)  # same seed and chunking -> same masks every call
    total, was_training = 0.0, mae.training
    mae.eval()
    with torch.no_grad():
        for chunk in hu.split(cfg.batch_size):
            loss, _, _ = mae(hu_to_windows(chunk.to(device), cfg.windows), generator)
            total += loss.item() * len(chunk)  # every volume has the same number of masked patches
    mae.train(was_training)
    return total / len(hu)


def _resume(path: Path, identity: dict[str, Any], mae: Any, optimizer: Any) -> tuple[int, dict[str, Any]]:
    from headct.train.checkpoint import config_differences, load_checkpoint, restore

    if not path.is_file():
        return 0, {}
    state = load_checkpoint(path)
    diffs = config_differences(state["config"], identity)
    if diffs:
        raise InputError(
            f"{path}: checkpoint of a different run ({'; '.join(diffs)}); delete it or set "
            "pretrain.checkpoint_dir elsewhere to start afresh"
        )
    return restore(state, mae, optimizer), dict(state["extra"])


def _figures(mae: Any, hu: Any, losses: list[float], cfg: PretrainConfig, device: Any) -> list[Path]:
    from headct.data.windows import hu_to_windows
    from headct.train.engine import step_generator
    from headct.train.plots import plot_loss_curve, plot_reconstruction

    mae.eval()
    x = hu_to_windows(hu[:1].to(device), cfg.windows)
    mask, recon = mae.reconstruct(x, step_generator(cfg.seed, 0, EVAL_STREAM))
    vol, mask, recon = (t[0].float().cpu().numpy() for t in (x, mask, recon))
    return [
        plot_loss_curve(losses, cfg.report_dir / "loss_curve.png"),
        plot_reconstruction(vol[0], mask[0], recon[0], cfg.report_dir / "mae_reconstruction.png",
                            cfg.windows[0].name),
    ]


def run(cfg: PretrainConfig, ctx: JobContext) -> dict[str, Any]:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table
    from torch.utils.data import DataLoader

    from headct import tracking
    from headct.data.augment import augment_hu
    from headct.data.splits import path_for_files
    from headct.data.volumes import StepBatchSampler, VolumeDataset
    from headct.data.windows import hu_to_windows
    from headct.device import resolve_device
    from headct.io import write_json
    from headct.models.mae import MAE
    from headct.models.model_dir import save_model_dir
    from headct.models.vit import build_encoder
    from headct.train.checkpoint import save_checkpoint
    from headct.train.engine import TrainStats, adamw, step_generator, train
    from headct.train.schedules import warmup_cosine

    console = Console()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg, ctx)
    grid = tuple(data.preprocess["shape"])
    if any(s % cfg.patch_size for s in grid):
        raise InputError(f"pretrain.patch_size={cfg.patch_size} does not divide the store's grid {list(grid)}")
    train_set = VolumeDataset(data.train_paths, data.train_ids, grid)
    heldout_set = VolumeDataset(data.heldout_paths, data.heldout_ids, grid)
    train_set.check()
    heldout_hu = heldout_set.load_all()

    torch.manual_seed(cfg.seed)  # initial weights
    encoder = build_encoder({"name": cfg.arch, "img_size": list(grid), "patch_size": cfg.patch_size,
                             "in_chans": len(cfg.windows)})
    mae = MAE(encoder, cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss).to(device)
    optimizer = adamw(mae, cfg.lr, cfg.weight_decay)
    total = cfg.samples // cfg.batch_size
    warmup = round(cfg.warmup_frac * total)
    identity = run_identity(cfg, data)
    # One folder per training identity: changing a setting that alters training starts a new run (as `dvc repro`
    # after a params change expects) instead of clashing with the old checkpoint; an interrupted run resumes.
    run_key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    checkpoint = cfg.checkpoint_dir / run_key / "last.pt"
    start, extra = _resume(checkpoint, identity, mae, optimizer)
    if start:
        console.print(f"resuming from {checkpoint} at step {start} of {total}")

    def compute_loss(hu: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        hu = hu.to(device, non_blocking=True)
        hu = augment_hu(hu, step_generator(cfg.seed, step, 2 * micro), cfg.flip_lr, cfg.jitter_hu, cfg.jitter_scale)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = mae(hu_to_windows(hu, cfg.windows), step_generator(cfg.seed, step, 2 * micro + 1))
        return loss

    with tracking.job_run(ctx.tracking, "pretrain", cfg, ctx.root) as mlrun:
        start_loss = extra.get("recon_loss_start")
        if start_loss is None:
            start_loss = recon_loss(mae, heldout_hu, cfg, device)
        mlrun.log_metrics({"recon_loss_heldout": start_loss}, step=0)

        def so_far(stats: TrainStats) -> dict[str, Any]:
            """Loss history and training time over every invocation of this run (resumes included)."""
            return {"recon_loss_start": start_loss, "losses": [*extra.get("losses", []), *stats.losses],
                    **{k: extra.get(k, 0) + getattr(stats, k) for k in ("seconds", "data_seconds", "samples")}}

        def save(done: int, stats: TrainStats) -> None:
            save_checkpoint(checkpoint, mae, optimizer, done, identity, so_far(stats))

        sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, start, total)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda")
        columns = (TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("steps", total=total, completed=start, loss="-")
            stats = train(
                mae, optimizer, (hu for hu, _ in loader), compute_loss, start_step=start, total_steps=total,
                lr_at=lambda s: warmup_cosine(s, total, cfg.lr, warmup, cfg.min_lr), grad_clip=cfg.grad_clip,
                accum_steps=cfg.accum_steps, checkpoint_every=cfg.checkpoint_every, save_checkpoint=save,
                log_every=cfg.log_every, on_log=lambda s, m: mlrun.log_metrics(m, step=s),
                on_step=lambda s, loss: progress.update(task, completed=s, loss=f"{loss:.4f}"),
            )
        end_loss = recon_loss(mae, heldout_hu, cfg, device)
        mlrun.log_metrics({"recon_loss_heldout": end_loss}, step=total)

        provenance = {"git_commit": tracking.git_commit(ctx.root), "data": data.provenance,
                      "params": {**dump_params(cfg), **{k: path_for_files(getattr(cfg, k), ctx.root) for k in
                                 ("splits", "model_dir", "checkpoint_dir", "report_dir")}}}
        save_model_dir(cfg.model_dir, mae.encoder, {
            "preprocess": data.preprocess, "windows": [w.model_dump(mode="json") for w in cfg.windows],
            "method": "mae", "provenance": provenance})
        run_so_far = so_far(stats)
        seconds = run_so_far["seconds"]
        metrics = {
            "recon_loss_start": start_loss, "recon_loss_end": end_loss, "steps": total,
            "samples": total * cfg.batch_size, "seconds": round(seconds, 2),
            "volumes_per_s": round(run_so_far["samples"] / seconds, 2) if seconds else 0.0,
            "data_wait_fraction": round(run_so_far["data_seconds"] / seconds, 4) if seconds else 0.0,
            "resumed_from_step": start, "train_scans": len(train_set), "heldout_scans": len(heldout_set),
        }
        write_json(cfg.report_dir / "metrics.json", metrics)
        figures = _figures(mae, heldout_hu, run_so_far["losses"], cfg, device)
        mlrun.log_metrics({k: v for k, v in metrics.items() if k != "resumed_from_step"}, step=total)
        mlrun.log_artifacts(cfg.model_dir, "model")
        for path in (cfg.report_dir / "metrics.json", *figures):
            mlrun.log_artifact(path, "reports")
    # Finished: keep the final state for inspection but never resume from it, so a re-run after a code change
    # trains again rather than silently re-emitting the old weights.
    if checkpoint.is_file():
        checkpoint.replace(checkpoint.with_name("complete.pt"))

    table = Table(title="headct pretrain (MAE)")
    table.add_column("item")
    table.add_column("value", justify="right")
    for name, value in (
        ("encoder", f"{cfg.arch}, patch {cfg.patch_size}, grid {list(grid)}"),
        ("training scans / held-out scans", f"{len(train_set)} / {len(heldout_set)}"
                                            + (" (val in training)" if cfg.use_val else "")),
        ("steps x batch", f"{total} x {cfg.batch_size}" + (f" (resumed at {start})" if start else "")),
        ("held-out masked MSE start -> end", f"{start_loss:.4f} -> {end_loss:.4f}"),
        ("training time (all invocations)", f"{seconds:.0f} s, {metrics['volumes_per_s']:.1f} volumes/s"),
        ("waiting for data", f"{100 * metrics['data_wait_fraction']:.1f} %"),
        ("model directory", path_for_files(cfg.model_dir, ctx.root)),
    ):
        table.add_row(name, value)
    console.print(table)
    return {**metrics, "model_dir": str(cfg.model_dir)}
