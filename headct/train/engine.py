"""The one training loop (nanoGPT-style, one visible loop) shared by every pre-training and fine-tuning job.

Everything random or scheduled is a function of the global step: the learning rate and weight decay (pure
functions passed in), the batch (the caller's sampler starts at the step), and augmentation/masking noise
(`step_generator`). A run resumed from a checkpoint therefore repeats an uninterrupted run exactly.
Distributed data parallel: the caller wraps the model in DistributedDataParallel (see `headct.train.distributed`)
and gives each rank its own batches; the loop skips the gradient all-reduce on all but the last micro-batch
(`no_sync`), agrees on a non-finite loss across ranks (so no rank hangs in an all-reduce the others left),
averages the logged loss over ranks and counts volumes/s over all of them; only rank 0 logs and checkpoints.
Mixed precision: `amp_dtype` (bf16 on GPU) runs `compute_loss` under autocast; bf16 needs no loss scaling.
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
    """Sum (or max) a few floats over ranks; identity outside a process group. Every rank must call it."""
    if not is_distributed():
        return values
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay only on weight matrices: norms, biases, position tables and tokens
    (anything 1-D or named in ``model.no_weight_decay()``) are not decayed. Group 0 decays, group 1 not."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"),
    )


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
    on_step: Callable[[int, float], None] | None = None,
    amp_dtype: torch.dtype | None = None,
    after_backward: Callable[[int], None] | None = None,
    after_update: Callable[[int], None] | None = None,
) -> TrainStats:
    """Run global steps start_step .. total_steps - 1.

    Args:
        batches: one batch per step, starting at `start_step` (e.g. a DataLoader over a StepBatchSampler).
        compute_loss: (micro-batch, global step, micro index) -> scalar loss; owns device transfer,
            augmentation and the model call, and seeds its randomness with `step_generator`.
        lr_at, wd_at: schedules of the global step; wd applies to the decayed param groups only.
        accum_steps: split each batch into this many micro-batches, one backward each, one optimizer step.
        save_checkpoint: called on rank 0 with (completed steps, this call's stats so far) every
            `checkpoint_every` steps and at the end.
        on_log: rank 0 only, every `log_every` steps: loss (mean since the last log), lr, volumes_per_s,
            data_wait_fraction.
        on_step: after every step with (completed steps, loss), e.g. for a progress bar.
        amp_dtype: run `compute_loss` under torch.autocast with this dtype (torch.bfloat16 on GPU); None = fp32.
        after_backward: (global step) after the gradients of a step are complete, before clipping and the
            update (DINO zeroes its last layer's gradients here in the first epoch).
        after_update: (global step) after the optimizer step (DINO's teacher EMA update).

    Raises:
        NonFiniteLossError: naming the step, before that step's update is applied.
    """
    stats = TrainStats(start_step, start_step)
    rank0 = is_rank0()
    device_type = next(model.parameters()).device.type
    model.train()
    window: dict[str, float] = {"loss": 0.0, "steps": 0, "samples": 0, "seconds": 0.0, "data": 0.0}
    iterator = iter(batches)
    t_prev = time.perf_counter()  # wall time is counted step to step, so logging and checkpoints are in it
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        t_data = time.perf_counter() - t0

        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if wd_at is not None and group["weight_decay"] > 0:
                group["weight_decay"] = wd_at(step)

        step_loss = 0.0
        parts = _split(batch, accum_steps)
        for micro, part in enumerate(parts):
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = compute_loss(part, step, micro)
            value = loss.item()
            (bad,) = _all_reduce([0.0 if math.isfinite(value) else 1.0], "max")
            if bad:
                raise NonFiniteLossError(
                    f"loss is {value if not math.isfinite(value) else 'non-finite on another rank'} at global "
                    f"step {step} (micro-batch {micro}, lr {lr:.3g}); training stopped before this update. Lower "
                    "the learning rate or check the input volumes; the last checkpoint holds the state before "
                    "the divergence."
                )
            # DDP all-reduces gradients in backward; with accumulation only the last micro-batch needs to.
            sync = micro == len(parts) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                (loss / accum_steps).backward()
            step_loss += value / accum_steps
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
        stats.losses.append(step_loss)
        for key, value in (("loss", step_loss), ("steps", 1), ("samples", n), ("seconds", seconds), ("data", t_data)):
            window[key] += value

        if on_step is not None:
            on_step(step + 1, step_loss)
        if (step + 1) % log_every == 0 or step + 1 == total_steps:
            # Every rank joins the reduction; the loss is the mean over ranks, volumes/s the sum over them.
            loss_sum, samples, data_sum = _all_reduce([window["loss"], window["samples"], window["data"]])
            world = torch.distributed.get_world_size() if is_distributed() else 1
            if rank0 and on_log is not None:
                on_log(step + 1, {
                    "loss": loss_sum / world / window["steps"],
                    "lr": lr,
                    "volumes_per_s": samples / window["seconds"],
                    "data_wait_fraction": data_sum / world / window["seconds"],
                })
            window = dict.fromkeys(window, 0.0)
        saved = bool(checkpoint_every) and (step + 1) % checkpoint_every == 0
        if rank0 and save_checkpoint is not None and (saved or step + 1 == total_steps):
            save_checkpoint(step + 1, stats)
    return stats
