"""Process-group set-up for data-parallel training under `torchrun` (gloo on CPU, NCCL on GPU).

`torchrun --nproc_per_node N headct pretrain ...` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT;
`start()` reads them, joins the group and picks this rank's device. Without torchrun it returns a one-process
context and nothing is initialised, so every job runs unchanged on a laptop.
Each rank reads its own share of every step's samples (StepBatchSampler with rank/world_size: the
DistributedSampler contract, but a function of the global step, so resuming needs no set_epoch bookkeeping).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size processes, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device: torch.device) -> DistContext:
    """Join the torchrun process group if there is one; `device` is the resolved training device type.

    On CUDA each rank takes GPU LOCAL_RANK and the NCCL backend; on CPU the gloo backend.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` when there are several ranks; the model itself otherwise."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        torch.distributed.barrier()


def stop(ctx: DistContext) -> None:
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (CPU bytes, name order): equal digests = identical models."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        # reshape(-1): a 0-dim buffer (batch norm's num_batches_tracked) cannot be viewed as bytes; same bytes
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RanksOutOfSyncError(RuntimeError):
    """Data-parallel ranks ended with different weights (a bug: DDP keeps them identical)."""


def check_in_sync(model: nn.Module, ctx: DistContext) -> str:
    """The weights' digest, after checking every rank holds the same one; RanksOutOfSyncError otherwise."""
    digest = weights_digest(model)
    if ctx.distributed:
        digests: list[str | None] = [None] * ctx.world_size
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RanksOutOfSyncError(f"ranks hold different weights after training: {digests}")
    return digest
