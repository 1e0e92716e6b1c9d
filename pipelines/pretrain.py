"""`headct pretrain`: MAE or DINO pre-training of a 3D ViT on the train (+ val, + pool) patients of a split, never test.

Recipe: read the split and the store's preprocessing spec -> hold out a fixed set of val patients for the
held-out check -> build encoder + pretext model (headct/train/pretext.py) -> resume from a compatible checkpoint
if there is one -> pretext loss on the held-out volumes (MAE: step 0 with fixed masks) -> train -> the same loss
(end; DINO scores its start here too, the seeded initial weights with the final centre, so both ends measure one
loss) -> model directory (encoder only) + metrics.json + figures -> MLflow -> registry.

The held-out patients are excluded from pre-training even when `use_val` is true, so the start/end loss
compares the model on volumes it has never seen; the rest of val is pre-trained on when `use_val` is true.
With `pool` true and a split that has a pool.csv (`split.labelled_train`), its scans are pre-trained on too (their
labels are never read); a pool patient found in val or test stops the job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headct.config.base import JobContext, dump_params
from headct.config.pretrain import PretrainConfig
from headct.errors import InputError

HELDOUT_STREAM = 7  # numpy stream that orders val patients for the held-out set


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
    from headct.data.splits import has_pool, path_for_files, read_pool, read_split, store_of_split
    from headct.data.store import read_preprocess

    store = store_of_split(cfg.splits, ctx.root)
    if store is None:
        raise InputError(f"{cfg.splits / 'split.json'}: not found (run `headct ingest` and `headct split` first)")
    preprocess = read_preprocess(store)
    train, val = read_split(cfg.splits, "train"), read_split(cfg.splits, "val")
    if val.empty:
        raise InputError(f"{cfg.splits / 'val.csv'}: no scans; the reconstruction check needs held-out val patients")
    held = set(heldout_patients(val, cfg.eval_volumes, cfg.seed))
    heldout = val[val["patient_id"].isin(held)].sort_values("scan_id").head(cfg.eval_volumes)
    parts = [train, val[~val["patient_id"].isin(held)]] if cfg.use_val else [train]
    pool = read_pool(cfg.splits) if cfg.pool and has_pool(cfg.splits) else None  # checked against every split
    if pool is not None:
        parts.append(pool)
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
    if pool is not None:  # only then, so a split without a pool records exactly what it did before
        provenance.update(pool_scans=len(pool), pool_patients=int(pool["patient_id"].nunique()))
    return PretrainData(
        [ctx.root / r.img_path for r in rows], train_ids,
        [ctx.root / p for p in heldout["img_path"]], list(heldout["scan_id"]), preprocess, provenance,
    )


def run_identity(cfg: PretrainConfig, data: PretrainData, world_size: int = 1) -> dict[str, Any]:
    """Everything that fixes the training trajectory (`headct.run_identity`); a checkpoint resumes only under the
    same identity (the number of ranks included: it changes which samples each step sees)."""
    from headct.run_identity import trajectory_params

    params = trajectory_params(cfg)
    if cfg.method != "dino":
        params.pop("dino", None)  # DINO settings don't touch an MAE run
    return {**params, "train_ids_sha256": data.provenance["train_ids_sha256"],
            "grid": list(data.preprocess["shape"]), "world_size": world_size}


def _resume(path: Path, identity: dict[str, Any], model: Any, optimizer: Any) -> tuple[int, dict[str, Any]]:
    from headct.train.checkpoint import load_for_resume, restore

    state = load_for_resume(path, identity, "pretrain.checkpoint_dir")
    if state is None:
        return 0, {}
    return restore(state, model, optimizer), dict(state["extra"])


def run(cfg: PretrainConfig, ctx: JobContext) -> dict[str, Any]:
    """One process, or one rank of a `torchrun` job (gloo on CPU, NCCL on GPU)."""
    import torch

    from headct.device import resolve_device
    from headct.train import distributed
    from headct.train.preemption import PreemptionGuard

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.start(resolve_device(cfg.device))
    try:
        with PreemptionGuard():  # SIGTERM/SIGUSR1: checkpoint at the next step, then Preempted (exit 75)
            return _run(cfg, ctx, dist)
    finally:
        distributed.stop(dist)


def _run(cfg: PretrainConfig, ctx: JobContext, dist: Any) -> dict[str, Any]:
    import contextlib
    import tempfile

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from torch.utils.data import DataLoader

    from headct import tracking
    from headct.data.volumes import StepBatchSampler, VolumeDataset
    from headct.device import amp_dtype
    from headct.models.model_dir import build_model_encoder
    from headct.models.vit import build_encoder
    from headct.run_identity import run_key as key_of
    from headct.run_meta import describe
    from headct.train import distributed
    from headct.train.checkpoint import save_checkpoint
    from headct.train.engine import TrainStats, adamw, train
    from headct.train.preemption import ignore_in_worker
    from headct.train.pretext import build_task
    from headct.train.schedules import dino_weight_decay, warmup_cosine

    console = Console(quiet=not dist.is_rank0)
    device = dist.device
    data = load_data(cfg, ctx)
    grid = tuple(data.preprocess["shape"])
    if cfg.arch != "cnn" and any(s % cfg.patch_size for s in grid):
        raise InputError(f"pretrain.patch_size={cfg.patch_size} does not divide the store's grid {list(grid)}")
    if cfg.arch == "cnn" and any(s % 16 for s in grid):  # the small CNN's four stride-2 units
        raise InputError(f"pretrain.arch=cnn needs a grid divisible by 16 per axis, the store's is {list(grid)}")
    train_set = VolumeDataset(data.train_paths, data.train_ids, grid)
    heldout_set = VolumeDataset(data.heldout_paths, data.heldout_ids, grid)
    train_set.check()
    heldout_hu = heldout_set.load_all()

    if cfg.method == "mim" and dist.world_size > 1:  # batch-norm statistics would differ rank by rank
        raise InputError("pretrain.method=mim trains the small CNN in one process (its batch norm is not "
                         f"synchronised across ranks); run it without torchrun (world size {dist.world_size})")
    global_batch = cfg.batch_size * dist.world_size
    total = cfg.samples // global_batch
    if total < 1:
        raise InputError(f"pretrain.samples={cfg.samples} is less than one step of {global_batch} volumes "
                         f"({dist.world_size} ranks x batch {cfg.batch_size})")
    steps_per_epoch = -(-len(train_set) // global_batch)

    def initial_task() -> Any:
        """Encoder + pretext model at their seeded initial weights (the same on every rank; DDP also broadcasts
        rank 0's); built again at the end where the start is scored then (`start_scored_at_end`)."""
        torch.manual_seed(cfg.seed)
        if cfg.arch == "cnn":  # masked restoration (mim); `headct extract` builds its random-init twin alike
            encoder = build_model_encoder({"name": "cnn", "in_chans": len(cfg.windows)})
        else:
            encoder = build_encoder({"name": cfg.arch, "img_size": list(grid), "patch_size": cfg.patch_size,
                                     "in_chans": len(cfg.windows), "num_registers": cfg.num_registers})
        return build_task(cfg, encoder, device, dist.rank, total_steps=total, steps_per_epoch=steps_per_epoch)

    task = initial_task()
    optimizer = adamw(task.model, cfg.lr, cfg.weight_decay)
    warmup = round(cfg.warmup_frac * total)
    identity = run_identity(cfg, data, dist.world_size)
    # One folder per training identity: changing a setting that alters training starts a new run (as `dvc repro`
    # after a params change expects) instead of clashing with the old checkpoint; an interrupted run resumes.
    run_key = key_of(identity)
    checkpoint = cfg.checkpoint_dir / run_key / "last.pt"
    start, extra = _resume(checkpoint, identity, task.model, optimizer)
    if start:
        console.print(f"resuming from {checkpoint} at step {start} of {total}")
    step_model = distributed.wrap(task.model, dist)
    if cfg.compile:
        step_model = torch.compile(step_model)
    wd_at = None
    if cfg.method == "dino":  # DINO's weight decay rises on a cosine (Caron et al. 2021)
        wd_at = lambda s: dino_weight_decay(s, total, cfg.weight_decay, cfg.dino.weight_decay_end)  # noqa: E731

    run_name = describe("pretrain", cfg, grid)[0]  # e.g. "pretrain mae vit-tiny p16 64^3"
    run_ctx = (tracking.job_run(ctx.tracking, "pretrain", cfg, ctx.root, tags={"headct.method": cfg.method},
                                run_name=run_name)
               if dist.is_rank0 else contextlib.nullcontext(None))
    with run_ctx as mlrun, tempfile.TemporaryDirectory(prefix="headct-figures-") as scratch:
        start_loss = extra.get("heldout_loss_start")
        if start_loss is None and dist.is_rank0 and not task.start_scored_at_end:
            start_loss = task.heldout_loss(heldout_hu)
        if mlrun is not None:
            mlrun.set_tags({"headct.world_size": dist.world_size, "headct.run_key": run_key})
            if start_loss is not None:
                mlrun.log_metrics({"heldout_loss": start_loss}, step=0)

        def so_far(stats: TrainStats) -> dict[str, Any]:
            """Loss history and training time over every invocation of this run (resumes included)."""
            return {"heldout_loss_start": start_loss, "losses": [*extra.get("losses", []), *stats.losses],
                    **{k: extra.get(k, 0) + getattr(stats, k) for k in ("seconds", "data_seconds", "samples")}}

        def save(done: int, stats: TrainStats) -> Path:
            save_checkpoint(checkpoint, task.model, optimizer, done, identity, so_far(stats))
            return checkpoint

        def on_log(done: int, metrics: dict[str, float]) -> None:
            progress.update(bar, loss=f"{metrics['loss']:.4f}")  # the mean since the last log
            if mlrun is not None:
                mlrun.log_metrics(metrics, step=done)

        def on_step(done: int) -> None:
            progress.update(bar, completed=done)
            if mlrun is not None and cfg.figure_every and done % cfg.figure_every == 0 and done < total:
                png = task.snapshot(heldout_hu, Path(scratch) / f"step_{done:07d}.png",
                                    title=f"{cfg.method.upper()} at step {done} (held-out volume)")
                if png is not None:
                    mlrun.log_artifact(png, "figures")

        sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, start, total, dist.rank, dist.world_size)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            worker_init_fn=ignore_in_worker)  # the main process alone handles a preemption
        columns = (TextColumn(f"pretrain ({cfg.method})"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=not dist.is_rank0) as progress:
            bar = progress.add_task("steps", total=total, completed=start, loss="-")
            stats = _train_or_record_preemption(
                mlrun, train, step_model, optimizer, (hu for hu, _ in loader),
                lambda hu, step, micro: task.loss(step_model, hu, step, micro),
                start_step=start, total_steps=total,
                lr_at=lambda s: warmup_cosine(s, total, cfg.lr, warmup, cfg.min_lr), wd_at=wd_at,
                grad_clip=cfg.grad_clip, accum_steps=cfg.accum_steps, checkpoint_every=cfg.checkpoint_every,
                save_checkpoint=save, log_every=cfg.log_every, on_log=on_log, on_step=on_step,
                amp_dtype=amp_dtype(cfg.amp, device),
                after_backward=task.after_backward, after_update=task.after_update,
            )
        digest = distributed.check_in_sync(task.model, dist)  # every rank; raises if DDP let them drift
        if not dist.is_rank0:
            distributed.barrier(dist)
            return {"rank": dist.rank, "weights_sha256": digest}
        result = _finish(cfg, ctx, data, task, heldout_hu, so_far(stats), (start, total), digest,
                         dist.world_size, mlrun, console, initial_task)
    distributed.barrier(dist)
    # Finished: keep the final state for inspection but never resume from it, so a re-run after a code change
    # trains again rather than silently re-emitting the old weights.
    if checkpoint.is_file():
        checkpoint.replace(checkpoint.with_name("complete.pt"))
    return result


def _train_or_record_preemption(mlrun: Any, train: Any, *args: Any, **kwargs: Any) -> Any:
    """`train(*args, **kwargs)`; a preemption is tagged on the MLflow run (which then ends as failed: the
    requeued job logs a new run that continues the same checkpoint) before it propagates."""
    from headct.train.preemption import Preempted

    try:
        return train(*args, **kwargs)
    except Preempted as exc:
        if mlrun is not None:
            mlrun.set_tags({"headct.preempted": f"{exc.signal_name} after step {exc.step}"})
        raise


def _finish(
    cfg: PretrainConfig, ctx: JobContext, data: PretrainData, task: Any, heldout_hu: Any, run_so_far: dict[str, Any],
    steps: tuple[int, int], digest: str, world_size: int, mlrun: Any, console: Any, initial_task: Any,
) -> dict[str, Any]:
    """Rank 0, after training: held-out loss at the end (and at the start where the task scores it now), model
    directory, metrics, figures, MLflow, registry."""
    import torch
    from rich.table import Table

    from headct import model_card, tracking
    from headct.data.splits import path_for_files
    from headct.headline import write_stage_headline
    from headct.io import write_json
    from headct.models.model_dir import save_model_dir
    from headct.train.plots import plot_loss_curve

    start, total = steps
    grid = list(data.preprocess["shape"])
    start_loss = run_so_far["heldout_loss_start"]
    end_loss = task.heldout_loss(heldout_hu)
    if task.start_scored_at_end:  # DINO: the initial weights scored with the final centre, as the end is
        with torch.random.fork_rng(devices=[]):
            initial = initial_task()
        start_loss = task.heldout_loss_of_initial(initial, heldout_hu)
        del initial
        mlrun.log_metrics({"heldout_loss": start_loss}, step=0)
    spread = task.feature_spread(heldout_hu)
    mlrun.log_metrics({"heldout_loss": end_loss}, step=total)
    provenance = {**tracking.git_state(ctx.root), "data": data.provenance,
                  "params": {**dump_params(cfg), **{k: path_for_files(getattr(cfg, k), ctx.root) for k in
                             ("splits", "model_dir", "checkpoint_dir", "report_dir")}}}
    save_model_dir(cfg.model_dir, task.encoder, {
        "preprocess": data.preprocess, "windows": [w.model_dump(mode="json") for w in cfg.windows],
        "method": cfg.method, "provenance": provenance,
        **({"mask_ratio": cfg.mask_ratio} if cfg.method == "mim" else {})}, extra=task.extra_weights())
    seconds = run_so_far["seconds"]
    metrics = {
        "method": cfg.method, "heldout_loss_start": start_loss, "heldout_loss_end": end_loss, "steps": total,
        "samples": total * cfg.batch_size * world_size, "world_size": world_size, "seconds": round(seconds, 2),
        "volumes_per_s": round(run_so_far["samples"] * world_size / seconds, 2) if seconds else 0.0,
        "data_wait_fraction": round(run_so_far["data_seconds"] / seconds, 4) if seconds else 0.0,
        "resumed_from_step": start, "train_scans": len(data.train_paths), "heldout_scans": len(data.heldout_paths),
        "weights_sha256": digest,
        **({"heldout_feature_spread": round(spread, 6)} if spread is not None else {}),
    }
    write_json(cfg.report_dir / "metrics.json", metrics)
    write_stage_headline(cfg.report_dir, "pretrain", metrics)  # the DVC metric: a few numbers of it
    figures = [plot_loss_curve(run_so_far["losses"], cfg.report_dir / "loss_curve.png",
                               f"{cfg.method.upper()} training loss", task.metric_name())]
    # One name for every method (MAE / mim: a reconstruction; DINO: its views), so the DVC stage's outputs hold
    # whichever method `-S pretrain.method=...` picks
    snapshot = task.snapshot(heldout_hu, cfg.report_dir / "pretext.png")
    figures += [snapshot] if snapshot is not None else []
    mlrun.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "resumed_from_step"},
                      step=total)
    # The model card and the registry description: one dict of facts (headct/model_card.py).
    facts = model_card.pretrain_facts(cfg, data.provenance, data.preprocess, metrics,
                                      {"git commit": provenance.get("git_commit")})
    model_card.write_card(cfg.model_dir, facts)
    mlrun.log_artifacts(cfg.model_dir, "model")
    for path in (cfg.report_dir / "metrics.json", *figures):
        mlrun.log_artifact(path, "reports")
    registered = None
    if cfg.register_as:
        from headct import registry
        from headct.train.pretext import COLLAPSE_SPREAD

        # Champion: finished (a diverged run raised earlier), held-out loss improved, and (DINO) not collapsed.
        improved = end_loss < start_loss and (spread is None or spread > COLLAPSE_SPREAD)
        registered = registry.register_encoder(
            cfg.model_dir, cfg.register_as, grid, task.encoder.embed_dim, promote=improved,
            tags={"method": cfg.method, "heldout_loss_start": f"{start_loss:.6g}",
                  "heldout_loss_end": f"{end_loss:.6g}", "run_id": mlrun.run_id},
            description=model_card.render(facts, title=False))

    table = Table(title=f"headct pretrain ({cfg.method.upper()})")
    table.add_column("item")
    table.add_column("value", justify="right")
    for name, value in (
        ("encoder", ("small CNN" if cfg.arch == "cnn" else f"{cfg.arch}, patch {cfg.patch_size}") + f", grid {grid}"
                    + (f", {cfg.num_registers} registers" if cfg.num_registers else "")
                    + f", {sum(p.numel() for p in task.encoder.parameters()) / 1e6:.2f} M parameters"),
        ("training scans / held-out scans", f"{len(data.train_paths)} / {len(data.heldout_paths)}"
                                            + (" (val in training)" if cfg.use_val else "")
                                            + (f" (pool: {data.provenance['pool_scans']})"
                                               if "pool_scans" in data.provenance else "")),
        ("steps x batch x ranks", f"{total} x {cfg.batch_size} x {world_size}"
                                  + (f" (resumed at {start})" if start else "")),
        (f"held-out {task.metric_name()} start -> end", f"{start_loss:.4f} -> {end_loss:.4f}"),
        ("training time (all invocations)", f"{seconds:.0f} s, {metrics['volumes_per_s']:.1f} volumes/s"),
        ("waiting for data", f"{100 * metrics['data_wait_fraction']:.1f} %"),
        ("model directory", path_for_files(cfg.model_dir, ctx.root)),
        ("registered model", "not registered" if registered is None else
         f"{registered['name']} v{registered['version']}"
         + (" (champion)" if registered["champion"] else " (held-out loss did not improve: not champion)")),
    ):
        table.add_row(name, value)
    console.print(table)
    return {**metrics, "model_dir": str(cfg.model_dir), "registered": registered}
