"""The one training loop (nanoGPT-style, one visible loop) shared by pre-training and fine-tuning.

Everything random or scheduled is a function of the global step: the learning rate and weight decay (pure
functions passed in), the batch (the caller's sampler starts at the step), and augmentation/masking noise
(`step_generator`). A run resumed from a checkpoint therefore repeats an uninterrupted run exactly.
Learning rates per parameter group: each step, group g gets lr_at(step) * g["lr_scale"] (1 when absent), so a
caller's groups (backbone vs head, or layer-wise decay) ride one schedule.
The host waits for the accelerator only at log steps, checkpoint steps and the last step ("sync points"): the
per-micro-batch losses stay on the device until then, so the loss logged at a sync point is still the exact mean of
every step since the previous one, and a non-finite loss is found there (naming the first step it happened at),
always before a checkpoint could save the broken state.
Distributed data parallel: the caller wraps the model in DistributedDataParallel (see `headct.train.distributed`)
and gives each rank its own batches; the loop skips the gradient all-reduce on all but the last micro-batch
(`no_sync`), agrees on a non-finite loss across ranks at every sync point (every rank joins, so none hangs in an
all-reduce the others left), averages the logged loss over ranks and counts volumes/s over all of them; only rank
0 logs and checkpoints.
Mixed precision: `amp_dtype` (bf16 on GPU, `headct.device.amp_dtype`) runs `compute_loss` under autocast; bf16
needs no loss scaling.
Preemption (`headct.train.preemption`): while a job's guard is installed, a trapped SIGTERM/SIGUSR1 makes the step
it arrived in the last one: that step ends at a sync point (losses checked), the checkpoint is written
(`save_on_preempt`, else `save_checkpoint`) and `Preempted` is raised; every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops rather than writing a broken model."""


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, global step, stream): streams keep e.g. augmentation and masking
    independent, and the same step always gets the same numbers, on any device."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group (e.g. under torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_rank0() -> bool:
    """True unless this process is a non-zero rank of an initialised process group."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or min/max) a few floats over ranks; identity outside a process group. Every rank must call it."""
    if not is_distributed():
        return values
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM))
    return t.tolist()


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
    groups: list[dict[str, Any]] | None = None,
) -> torch.optim.AdamW:
    """AdamW, fused on CPU and CUDA, for pre-training and fine-tuning alike.

    betas (0.9, 0.95): MAE's pre-training choice (He et al. 2022), used here for fine-tuning too (MAE's own
    fine-tuning recipe keeps 0.999) so that one optimizer convention serves every run: a second-moment memory of
    ~20 steps instead of ~1,000 follows the gradient scale within the few hundred steps of a fine-tuning run
    (whose gradients change scale when a frozen backbone is released) and keeps an update bounded when a rare
    large gradient follows many small ones.
    groups: parameter groups (each with "params", "weight_decay", "decay" and optionally "lr_scale", which the
    loop multiplies into the schedule's lr: backbone vs head, or layer-wise decay). None: weight decay only on
    weight matrices; norms, biases, position tables and tokens (anything 1-D or named in
    ``model.no_weight_decay()``) are not decayed. Group 0 decays, group 1 not.
    "decay" marks the groups a weight-decay schedule (`train`'s wd_at) drives; it is set here and by the group
    builders, never inferred from the value, so a schedule that starts at 0 (weight_decay: 0) still rises.
    """
    if groups is None:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay, "decay": True},
                  {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))


@dataclass
class TrainStats:
    """What one call of `train` did: steps run, wall time, time spent waiting for batches, per-step losses."""

    start_step: int
    end_step: int
    seconds: float = 0.0
    data_seconds: float = 0.0
    samples: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def volumes_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0


def _decays(group: dict[str, Any], index: int) -> bool:
    """Whether a weight-decay schedule drives this param group: its "decay" mark (ValueError without one)."""
    if "decay" not in group:
        raise ValueError(f"optimizer param group {index} has no 'decay' mark, so a weight-decay schedule cannot "
                         "tell whether it decays (build groups with engine.adamw or train.param_groups)")
    return bool(group["decay"])


def _split(batch: Any, parts: int) -> list[Any]:
    """A batch (tensor, or tuple/list of tensors and lists) -> `parts` micro-batches along dim 0."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, tuple | list):
        columns = [_split(item, parts) for item in batch]
        return [type(batch)(col[i] for col in columns) for i in range(parts)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} for gradient accumulation")


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, tuple | list) else batch
    return len(first)


def _step_losses(micro_losses: list[list[torch.Tensor]], accum_steps: int) -> list[float]:
    """Per-step losses from the device (one transfer): the mean of each step's micro-batch losses, summed in the
    order and precision (float64) the loop always used, so logged numbers do not depend on when they are read."""
    if not micro_losses:
        return []
    flat = torch.stack([loss.to(torch.float64) for step in micro_losses for loss in step]).cpu().tolist()
    out, i = [], 0
    for step in micro_losses:
        total = 0.0
        for value in flat[i : i + len(step)]:
            total += value / accum_steps
        out.append(total)
        i += len(step)
    return out


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    compute_loss: Callable[[Any, int, int], torch.Tensor],
    *,
    start_step: int,
    total_steps: int,
    lr_at: Callable[[int], float],
    wd_at: Callable[[int], float] | None = None,
    grad_clip: float | None = None,
    accum_steps: int = 1,
    checkpoint_every: int | None = None,
    save_checkpoint: Callable[[int, TrainStats], None] | None = None,
    log_every: int = 20,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    amp_dtype: torch.dtype | None = None,
    after_backward: Callable[[int], None] | None = None,
    after_update: Callable[[int], None] | None = None,
    save_on_preempt: Callable[[int, TrainStats], str | None] | None = None,
) -> TrainStats:
    """Run global steps start_step .. total_steps - 1.

    Args:
        batches: one batch per step, starting at `start_step` (e.g. a DataLoader over a StepBatchSampler).
        compute_loss: (micro-batch, global step, micro index) -> scalar loss; owns device transfer,
            augmentation and the model call, and seeds its randomness with `step_generator`.
        lr_at, wd_at: schedules of the global step; a param group's lr is lr_at(step) times its "lr_scale"
            (1 when absent); wd applies to the groups marked "decay" (see `adamw`) only.
        accum_steps: split each batch into this many micro-batches, one backward each, one optimizer step.
        save_checkpoint: called on rank 0 with (completed steps, this call's stats so far) every
            `checkpoint_every` steps and at the end, after the sync point has checked the losses.
        on_log: rank 0 only, every `log_every` steps and at the end: loss (mean over the steps since the last
            log), lr (the largest group lr of the step), volumes_per_s, data_wait_fraction.
        on_step: after every step with the completed steps (e.g. for a progress bar); no loss, so the host need
            not wait for the device every step.
        amp_dtype: run `compute_loss` under torch.autocast with this dtype (torch.bfloat16 on GPU); None = fp32.
        after_backward: (global step) after the gradients of a step are complete, before clipping and the
            update (DINO zeroes its last layer's gradients here in the first epoch).
        after_update: (global step) after the optimizer step (DINO's teacher EMA update).
        save_on_preempt: called on rank 0 instead of `save_checkpoint` when a trapped signal stops training
            (fine-tuning's checkpoint needs its epoch context); it may return the checkpoint's path, for the
            message. None: `save_checkpoint` is called (if given).

    Raises:
        headct.train.preemption.Preempted: after the step in which a trapped signal arrived, once its
            checkpoint is written (see the module docstring).
        NonFiniteLossError: at the first sync point after a non-finite loss, naming the first step it happened
            at; no checkpoint is written from that step on (the last one holds the state before it).
    """
    from headct.train import preemption

    guarded = preemption.active()  # the same on every rank: every rank's job installs its guard
    stats = TrainStats(start_step, start_step)
    rank0 = is_rank0()
    world = torch.distributed.get_world_size() if is_distributed() else 1
    device_type = next(model.parameters()).device.type
    model.train()
    window: dict[str, float] = {"loss": 0.0, "steps": 0, "samples": 0, "seconds": 0.0, "data": 0.0}
    pending: list[list[torch.Tensor]] = []  # per step since the last sync point: its micro-batch losses, on device
    iterator = iter(batches)
    t_prev = time.perf_counter()  # wall time is counted step to step, so logging and checkpoints are in it
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            t_data = time.perf_counter() - t0

            lr = lr_at(step)
            for index, group in enumerate(optimizer.param_groups):
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if wd_at is not None and _decays(group, index):
                    group["weight_decay"] = wd_at(step)

            parts = _split(batch, accum_steps)
            micro_losses = []
            for micro, part in enumerate(parts):
                with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = compute_loss(part, step, micro)
                micro_losses.append(loss.detach())
                # DDP all-reduces gradients in backward; with accumulation only the last micro-batch needs to.
                sync = micro == len(parts) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    (loss / accum_steps).backward()
            pending.append(micro_losses)
            if after_backward is not None:
                after_backward(step)
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_update is not None:
                after_update(step)

            now = time.perf_counter()
            seconds, t_prev = now - t_prev, now
            n = _batch_len(batch)
            stats.end_step = step + 1
            stats.seconds += seconds
            stats.data_seconds += t_data
            stats.samples += n
            for key, value in (("steps", 1), ("samples", n), ("seconds", seconds), ("data", t_data)):
                window[key] += value
            if on_step is not None:
                on_step(step + 1)

            stop = preemption.stop_requested() if guarded else None  # agreed over ranks
            last = step + 1 == total_steps
            logs = (step + 1) % log_every == 0 or last
            saves = (bool(checkpoint_every) and (step + 1) % checkpoint_every == 0) or last or stop is not None
            if not (logs or saves):  # the same steps on every rank: they depend on settings only
                continue
            # Sync point: the one wait for the device (and, under DDP, the one all-reduce) since the last one.
            first = step + 1 - len(pending)
            losses = _step_losses(pending, accum_steps)
            pending = []
            bad = next((first + i for i, value in enumerate(losses) if not math.isfinite(value)), math.inf)
            (first_bad,) = _all_reduce([bad], "min")
            if math.isfinite(first_bad):
                at = int(first_bad)
                own = losses[at - first] if at >= first and at - first < len(losses) else None
                what = own if own is not None and not math.isfinite(own) else "non-finite on another rank"
                raise NonFiniteLossError(
                    f"loss is {what} at global step {at} (lr {lr_at(at):.3g}); training stopped at step {step + 1} "
                    "before any checkpoint of the diverged state. Lower the learning rate or check the input "
                    "volumes; the last checkpoint holds the state before the divergence."
                )
            stats.losses.extend(losses)
            for value in losses:  # one by one, in step order: the same float sums as adding after every step
                window["loss"] += value
            if logs:
                # Every rank joins the reduction; the loss is the mean over ranks, volumes/s the sum over them.
                loss_sum, samples, data_sum = _all_reduce([window["loss"], window["samples"], window["data"]])
                if rank0 and on_log is not None:
                    on_log(step + 1, {
                        "loss": loss_sum / world / window["steps"],
                        "lr": max(group["lr"] for group in optimizer.param_groups),
                        "volumes_per_s": samples / window["seconds"],
                        "data_wait_fraction": data_sum / world / window["seconds"],
                    })
                window = dict.fromkeys(window, 0.0)
            if stop is not None:
                saved = None
                if rank0 and (save_on_preempt or save_checkpoint) is not None:
                    saved = (save_on_preempt or save_checkpoint)(step + 1, stats)
                raise preemption.Preempted(step + 1, stop, str(saved) if saved else None)
            if rank0 and saves and save_checkpoint is not None:
                save_checkpoint(step + 1, stats)
    finally:
        # Drop the data iterator on every way out (a preemption, an error): it shuts a DataLoader's workers down
        # through their queues. Kept alive by a traceback until interpreter exit, its workers (which ignore the
        # preemption signals, headct.train.preemption.ignore_in_worker) would block multiprocessing's exit handler,
        # which ends daemonic children with SIGTERM and then joins them: the process hung instead of exiting.
        iterator = None  # noqa: F841
    return stats
