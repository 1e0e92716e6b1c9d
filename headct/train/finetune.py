"""End-to-end fine-tuning of a classifier (backbone + head) on the one training engine, `headct.train.engine`.

Shared by `headct finetune` and every `headct tune` trial (through `headct.train.finetune_data.train_classifier`).
One epoch = one call of `engine.train` over ceil(train scans / batch) global steps, reading batches through the
data machinery pre-training uses (`LabelledVolumeDataset` over the checked reader, `StepBatchSampler`, or
`WeightedStepSampler` for class-balanced sampling); after each epoch the model scores val and the epoch with the
best mean val AUROC (over the trained labels) is kept. Test never enters here.

Loss: BCE per label with logits, unknown targets (NaN) masked out, optionally class-weighted with
pos_weight = negatives / positives of that label in train. Optimizer: the engine's AdamW (`engine.adamw`, the same
betas as pre-training) over parameter groups whose `lr_scale` is their peak learning rate (backbone vs head, or
layer-wise groups of the backbone passed in), on one unit-peak warm-up + cosine schedule over all steps; during
`freeze_backbone_epochs` the backbone gets no gradient (so no update). Augmentation (left-right flip, HU
offset/gain) and sampling draw their randomness from the global step, so a run is deterministic given its seed
and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headct.errors import InputError

AUGMENT_STREAM = 11  # step_generator stream of the fine-tuning augmentation
SAMPLER_STREAM = 12  # numpy stream of the class-balanced sampler


# ------------------------------------------------------------------------------------------------ loss
def pos_weights(targets: np.ndarray) -> np.ndarray:
    """(n, L) targets (NaN unknown) -> (L,) BCE pos_weight = known negatives / known positives (1 if none)."""
    pos = np.nansum(targets == 1, axis=0).astype(np.float64)
    neg = np.nansum(targets == 0, axis=0).astype(np.float64)
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE-with-logits over the known (non-NaN) entries of (B, L) targets; 0 (with a graph) if none."""
    known = ~torch.isnan(targets)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets), pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ groups
def param_groups(
    model: nn.Module, backbone_lr: float, head_lr: float, weight_decay: float,
    backbone_groups: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups for a unit-peak schedule: each group's `lr_scale` is its peak learning rate, and `part` says
    whether it is "backbone" or "head".

    Args:
        backbone_groups: groups of the backbone's parameters, e.g. from a layer-wise lr decay function, each with
            "params" and optionally "lr_scale" (a multiplier of backbone_lr, default 1), "weight_decay"
            (default `weight_decay`) and "decay" (default: True unless the group sets a weight_decay of 0).
            None: the backbone's weight matrices (decayed) and the rest (not decayed).
    The head is always split into decayed weight matrices and undecayed norms/biases/queries. Every trainable
    parameter must be in exactly one group (ValueError naming the strays otherwise).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    split: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "head"
        if part == "head" or backbone_groups is None:
            split.setdefault((part, param.ndim > 1 and name not in skip), []).append(param)
    groups = [{"params": params, "weight_decay": weight_decay if decay else 0.0, "decay": decay, "part": part,
               "lr_scale": backbone_lr if part == "backbone" else head_lr}
              for (part, decay), params in split.items()]
    for group in backbone_groups or []:
        own = group.get("weight_decay", weight_decay)
        groups.append({**group, "params": list(group["params"]), "part": "backbone", "weight_decay": own,
                       # a group taking the section's decay is a decayed group whatever its value (0 included)
                       "decay": group.get("decay", "weight_decay" not in group or own > 0),
                       "lr_scale": backbone_lr * group.get("lr_scale", 1.0)})
    grouped = Counter(id(p) for g in groups for p in g["params"])
    names = {id(p): name for name, p in model.named_parameters()}
    strays = sorted(names[i] for i in set(names) - set(grouped))
    repeated = sorted(names.get(i, "?") for i, n in grouped.items() if n > 1)
    if strays or repeated:
        raise ValueError(f"parameter groups must hold every parameter once: missing {strays[:5]}, repeated "
                         f"{repeated[:5]}")
    return groups


# ------------------------------------------------------------------------------------------------ training
@dataclass
class FitSettings:
    """What one fine-tuning run needs besides the model and data (a subset of `FinetuneConfig`)."""

    epochs: int
    batch_size: int
    backbone_lr: float
    head_lr: float
    weight_decay: float
    warmup_frac: float = 0.1
    accum_steps: int = 1
    freeze_backbone_epochs: int = 0
    class_weighted_loss: bool = True
    balanced_sampling: bool = False
    grad_clip: float | None = 3.0
    flip_lr: bool = True
    jitter_hu: float = 0.0
    jitter_scale: float = 0.0
    eval_batch_size: int = 16
    seed: int = 0
    amp_dtype: Any = None

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> FitSettings:
        names = cls.__dataclass_fields__.keys() - {"amp_dtype"}
        return cls(**{**{n: getattr(cfg, n) for n in names}, **overrides})


@dataclass
class FitResult:
    """Best epoch (0-based) and its weights (CPU copy), val AUROCs per epoch, steps and seconds trained."""

    best_epoch: int
    best_val_auroc: float
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def fit(
    classifier: nn.Module,
    train_set: Any,
    val_paths: Sequence[Path],
    val_targets: np.ndarray,
    labels: Sequence[str],
    windows: Sequence[Any],
    settings: FitSettings,
    device: Any,
    *,
    backbone_groups: list[dict[str, Any]] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    save_state: Callable[[int, nn.Module, torch.optim.Optimizer, dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train `classifier` for `settings.epochs` epochs, scoring val after each; keep the best epoch's weights.

    Args:
        train_set: a `headct.data.volumes.LabelledVolumeDataset` (item -> (int16 HU, targets with NaN unknown)).
        val_paths, val_targets: val volumes (store paths) and their (n, L) targets.
        backbone_groups: see `param_groups` (e.g. layer-wise lr decay); None: one backbone lr.
        on_epoch: (epoch, {"val_auroc_mean", "val_auroc": {label: auroc}, "train_loss", "step"}) after each
            epoch's val scoring; may raise (e.g. optuna.TrialPruned) to stop the run.
        on_log: the engine's training log once per epoch (loss, lr of the head, volumes/s), by global step.
        save_state: (completed steps, model, optimizer, extra) after each epoch, e.g. an atomic checkpoint;
            extra holds the epoch, the history, the best epoch's weights and the seconds trained so far, so a
            run can resume from it.
        resume: a checkpoint written through `save_state` (headct.train.checkpoint.load_checkpoint): model,
            optimizer, RNG, history and best epoch are restored and training continues with the next epoch, or,
            after a preemption (`headct.train.preemption`) mid-epoch, with the next step of the interrupted one.
    A trapped SIGTERM/SIGUSR1 stops training after the current step: `save_state` gets the completed steps with
    the interrupted epoch's losses so far ("epoch_losses") and "epoch" = the last complete epoch.
    """
    from torch.utils.data import DataLoader

    from headct.data.augment import augment_hu
    from headct.data.volumes import StepBatchSampler, WeightedStepSampler, class_balanced_weights
    from headct.data.windows import hu_to_windows
    from headct.eval.features import score_volumes
    from headct.eval.metrics import label_aurocs
    from headct.train.engine import adamw, step_generator, train
    from headct.train.schedules import warmup_cosine

    s = settings
    classifier.to(device)
    steps_per_epoch = math.ceil(len(train_set) / s.batch_size)
    total = s.epochs * steps_per_epoch
    warmup = round(s.warmup_frac * total)
    groups = param_groups(classifier, s.backbone_lr, s.head_lr, s.weight_decay, backbone_groups)
    optimizer = adamw(classifier, s.head_lr, s.weight_decay, groups=groups)
    weight = torch.tensor(pos_weights(train_set.targets), dtype=torch.float32, device=device)
    pos_weight = weight if s.class_weighted_loss else None
    balanced = class_balanced_weights(train_set.targets) if s.balanced_sampling else None

    def compute_loss(batch: Any, step: int, micro: int) -> torch.Tensor:
        hu, targets = batch
        hu = augment_hu(hu.to(device, non_blocking=True), step_generator(s.seed, step, AUGMENT_STREAM + micro),
                        s.flip_lr, s.jitter_hu, s.jitter_scale)
        logits = classifier(hu_to_windows(hu, windows))
        return masked_bce(logits, targets.to(device), pos_weight)

    result = FitResult(best_epoch=-1, best_val_auroc=-math.inf, best_state={})
    first_epoch, resume_step, epoch_losses, earlier_seconds = 0, 0, [], 0.0
    if resume is not None:
        from headct.train.checkpoint import restore

        restore(resume, classifier, optimizer)
        extra = resume["extra"]
        first_epoch = int(extra["epoch"]) + 1
        result.history = list(extra["history"])
        result.best_epoch, result.best_val_auroc = int(extra["best_epoch"]), float(extra["best_val_auroc"])
        result.best_state = dict(extra["best_state"])
        resume_step, epoch_losses = int(resume["step"]), list(extra.get("epoch_losses", []))  # mid-epoch stop
        # what the earlier invocations did: a run resumed after its last epoch reports the same steps, and the
        # training time of all invocations (seconds; absent in checkpoints written before it was recorded)
        result.steps, earlier_seconds = resume_step, float(extra.get("seconds", 0.0))
        result.seconds = earlier_seconds
    start_time = time.perf_counter()
    for epoch in range(first_epoch, s.epochs):
        first, last = max(epoch * steps_per_epoch, resume_step), (epoch + 1) * steps_per_epoch
        done_before = epoch_losses if epoch == first_epoch else []  # this epoch's steps before a preemption
        frozen = epoch < s.freeze_backbone_epochs
        for name, param in classifier.named_parameters():
            if name.startswith("backbone."):
                param.requires_grad_(not frozen)  # no gradient -> AdamW leaves the parameter (and its state) alone
        sampler = (WeightedStepSampler(balanced, s.batch_size, s.seed, first, last, SAMPLER_STREAM)
                   if balanced is not None else StepBatchSampler(len(train_set), s.batch_size, s.seed, first, last))
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=0,
                            pin_memory=torch.device(device).type == "cuda")

        def on_preempt(done: int, so_far: Any, epoch: int = epoch, before: list = done_before) -> Any:
            if save_state is None:
                return None
            return save_state(done, classifier, optimizer, {
                "epoch": epoch - 1, "history": copy.deepcopy(result.history), "best_epoch": result.best_epoch,
                "best_val_auroc": result.best_val_auroc, "best_state": result.best_state,
                "epoch_losses": [*before, *so_far.losses],
                "seconds": earlier_seconds + time.perf_counter() - start_time})

        stats = train(classifier, optimizer, loader, compute_loss, start_step=first, total_steps=last,
                      lr_at=lambda step: warmup_cosine(step, total, 1.0, warmup), grad_clip=s.grad_clip,
                      accum_steps=s.accum_steps, log_every=max(1, steps_per_epoch), on_log=on_log,
                      amp_dtype=s.amp_dtype, save_on_preempt=on_preempt)
        probs = score_volumes(classifier, val_paths, windows, s.eval_batch_size, train_set.shape)
        aurocs = label_aurocs(val_targets, probs, labels)
        if not aurocs:
            raise InputError("val has no label with both positives and negatives; nothing to select on")
        mean = float(np.mean(list(aurocs.values())))
        record = {"epoch": epoch, "step": last, "val_auroc_mean": mean, "val_auroc": aurocs,
                  "train_loss": float(np.mean([*done_before, *stats.losses])), "backbone_frozen": frozen}
        result.history.append(record)
        if mean > result.best_val_auroc:  # ties keep the earlier epoch
            result.best_epoch, result.best_val_auroc = epoch, mean
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in classifier.state_dict().items()}
        result.steps, result.seconds = last, earlier_seconds + time.perf_counter() - start_time
        if save_state is not None:
            save_state(last, classifier, optimizer, {
                "epoch": epoch, "history": copy.deepcopy(result.history), "best_epoch": result.best_epoch,
                "best_val_auroc": result.best_val_auroc, "best_state": result.best_state,
                "seconds": result.seconds})
        if on_epoch is not None:
            on_epoch(epoch, record)
    return result
