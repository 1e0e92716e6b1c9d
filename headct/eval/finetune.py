"""End-to-end fine-tuning of a classifier (backbone + head) through the one training loop, `headct.train.engine`.

Shared by `headct finetune` and every `headct tune` trial. One epoch = one call of `engine.train` over
ceil(train scans / batch) global steps; after each epoch the model scores val and the epoch with the best mean
val AUROC (over the trained labels) is kept. Test never enters here.

Loss: BCE per label with logits, unknown targets (NaN) masked out, optionally class-weighted with
pos_weight = negatives / positives of that label in train. Learning rates: separate peaks for the backbone and
the head on one warm-up + cosine schedule over all steps; during `freeze_backbone_epochs` the backbone gets no
gradient. Augmentation (left-right flip, HU offset/gain) and class-balanced sampling draw their randomness from
the global step, so a run is deterministic given its seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from headct.data.volumes import load_volume
from headct.errors import InputError
from headct.eval.metrics import auroc

AUGMENT_STREAM = 11  # step_generator stream of the fine-tuning augmentation
SAMPLER_STREAM = 12  # numpy stream of the class-balanced sampler


# ------------------------------------------------------------------------------------------------ data
class LabelledVolumes(Dataset):
    """Item i -> (HU volume (X, Y, Z) int16, targets (L,) float32 with NaN = unknown)."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, shape: Sequence[int] | None = None) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} target rows")
        self.paths, self.targets, self.shape = [Path(p) for p in paths], np.asarray(targets, np.float32), shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = load_volume(self.paths[index], shape=self.shape)
        return torch.from_numpy(volume), torch.from_numpy(self.targets[index])


def targets_of(frame: Any, labels: Sequence[str]) -> np.ndarray:
    """(n, L) float32 targets of a split frame: 1/0, NaN where the label is unknown."""
    return np.stack([frame[label].astype("Float32").to_numpy(dtype=np.float32, na_value=np.nan)
                     for label in labels], axis=1) if labels else np.zeros((len(frame), 0), np.float32)


def pos_weights(targets: np.ndarray) -> np.ndarray:
    """(n, L) targets (NaN unknown) -> (L,) BCE pos_weight = known negatives / known positives (1 if none)."""
    pos = np.nansum(targets == 1, axis=0).astype(np.float64)
    neg = np.nansum(targets == 0, axis=0).astype(np.float64)
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)


def balanced_weights(targets: np.ndarray) -> np.ndarray:
    """(n, L) targets -> (n,) sampling probabilities: each scan weighs 1 / (share of its class) for the label
    where that is largest (its rarest class), so every label's minority class is drawn about as often as its
    majority. Unknown values do not count."""
    weights = np.ones(len(targets))
    for column in np.asarray(targets).T:
        known = ~np.isnan(column)
        for value in (0.0, 1.0):
            members = known & (column == value)
            if members.any():
                weights[members] = np.maximum(weights[members], known.sum() / members.sum())
    return weights / weights.sum()


class BalancedStepSampler(torch.utils.data.Sampler[list[int]]):
    """Indices of steps start_step .. total_steps - 1, drawn with replacement from `probabilities`; step s's
    draw is a function of (seed, s) only, as for `StepBatchSampler`."""

    def __init__(self, probabilities: np.ndarray, batch_size: int, seed: int, start_step: int, total_steps: int):
        self.p, self.batch_size, self.seed = probabilities, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            rng = np.random.default_rng([self.seed, SAMPLER_STREAM, step])
            yield rng.choice(len(self.p), size=self.batch_size, replace=True, p=self.p).tolist()


# ------------------------------------------------------------------------------------------------ loss
def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE-with-logits over the known (non-NaN) entries of (B, L) targets; 0 (with a graph) if none."""
    known = ~torch.isnan(targets)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets), pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ scoring
def score_volumes(
    classifier: nn.Module, paths: Sequence[Path], windows: Sequence[Any], batch_size: int, device: Any,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """(n, L) float64 sigmoid probabilities of `paths` (int16 HU .npy files), in eval mode, no augmentation."""
    from headct.data.windows import hu_to_windows

    classifier.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            hu = np.stack([load_volume(p, shape=shape) for p in paths[start : start + batch_size]])
            x = hu_to_windows(torch.from_numpy(hu).to(device), windows)
            out.append(torch.sigmoid(classifier(x).float()).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def label_aurocs(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """AUROC per label over its known targets; labels lacking a class are left out."""
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if (y == 1).any() and (y == 0).any():
            out[label] = auroc(y.astype(np.int8), probs[known, j])
    return out


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


def param_groups(model: nn.Module, backbone_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: (backbone, head) x (decayed weight matrices, undecayed norms/biases/tokens); each group
    carries its `peak_lr` (the schedule scales it) and `part`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "head"
        decay = param.ndim > 1 and name not in skip
        groups.setdefault((part, decay), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "part": part,
             "peak_lr": backbone_lr if part == "backbone" else head_lr}
            for (part, decay), params in groups.items()]


def fit(
    classifier: nn.Module,
    train_set: LabelledVolumes,
    val_paths: Sequence[Path],
    val_targets: np.ndarray,
    labels: Sequence[str],
    windows: Sequence[Any],
    settings: FitSettings,
    device: Any,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    save_state: Callable[[int, nn.Module, torch.optim.Optimizer, dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train `classifier` for `settings.epochs` epochs, scoring val after each; keep the best epoch's weights.

    Args:
        on_epoch: (epoch, {"val_auroc_mean", "val_auroc": {label: auroc}, "train_loss", "step"}) after each
            epoch's val scoring; may raise (e.g. optuna.TrialPruned) to stop the run.
        on_log: the engine's periodic training log (loss, lr of the head, volumes/s), by global step.
        save_state: (completed steps, model, optimizer, extra) after each epoch, e.g. an atomic checkpoint;
            extra holds the epoch, the history and the best epoch's weights, so a run can resume from it.
        resume: a checkpoint written through `save_state` (headct.train.checkpoint.load_checkpoint): model,
            optimizer, RNG, history and best epoch are restored and training continues with the next epoch.
            Sampling and augmentation are functions of the global step, so the result equals an uninterrupted run.
    """
    import time

    from headct.data.augment import augment_hu
    from headct.data.volumes import StepBatchSampler
    from headct.data.windows import hu_to_windows
    from headct.train.engine import step_generator, train
    from headct.train.schedules import warmup_cosine

    s = settings
    classifier.to(device)
    steps_per_epoch = math.ceil(len(train_set) / s.batch_size)
    total = s.epochs * steps_per_epoch
    warmup = round(s.warmup_frac * total)
    optimizer = torch.optim.AdamW(param_groups(classifier, s.backbone_lr, s.head_lr, s.weight_decay),
                                  lr=s.head_lr, betas=(0.9, 0.999))
    weight = torch.tensor(pos_weights(train_set.targets), dtype=torch.float32, device=device)
    pos_weight = weight if s.class_weighted_loss else None
    balanced = balanced_weights(train_set.targets) if s.balanced_sampling else None

    def factor(step: int) -> float:
        return warmup_cosine(step, total, 1.0, warmup)

    def set_group_lrs(step: int) -> None:
        """The engine sets every group to the head lr; the backbone groups get their own peak (0 if frozen)."""
        frozen = step // steps_per_epoch < s.freeze_backbone_epochs
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if frozen and group["part"] == "backbone" else group["peak_lr"] * factor(step)

    def compute_loss(batch: Any, step: int, micro: int) -> torch.Tensor:
        hu, targets = batch
        hu = augment_hu(hu.to(device, non_blocking=True), step_generator(s.seed, step, AUGMENT_STREAM + micro),
                        s.flip_lr, s.jitter_hu, s.jitter_scale)
        logits = classifier(hu_to_windows(hu, windows))
        return masked_bce(logits, targets.to(device), pos_weight)

    result = FitResult(best_epoch=-1, best_val_auroc=-math.inf, best_state={})
    first_epoch = 0
    if resume is not None:
        from headct.train.checkpoint import restore

        restore(resume, classifier, optimizer)
        extra = resume["extra"]
        first_epoch = int(extra["epoch"]) + 1
        result.history = list(extra["history"])
        result.best_epoch, result.best_val_auroc = int(extra["best_epoch"]), float(extra["best_val_auroc"])
        result.best_state = dict(extra["best_state"])
    start_time = time.perf_counter()
    for epoch in range(first_epoch, s.epochs):
        first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch
        frozen = epoch < s.freeze_backbone_epochs
        for name, param in classifier.named_parameters():
            if name.startswith("backbone."):
                param.requires_grad_(not frozen)
        sampler = (BalancedStepSampler(balanced, s.batch_size, s.seed, first, last) if balanced is not None
                   else StepBatchSampler(len(train_set), s.batch_size, s.seed, first, last))
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=0)
        stats = train(classifier, optimizer, loader, compute_loss, start_step=first, total_steps=last,
                      lr_at=lambda step: s.head_lr * factor(step), grad_clip=s.grad_clip,
                      accum_steps=s.accum_steps, log_every=max(1, steps_per_epoch), on_log=on_log,
                      amp_dtype=s.amp_dtype, after_backward=set_group_lrs)
        probs = score_volumes(classifier, val_paths, windows, s.eval_batch_size, device, train_set.shape)
        aurocs = label_aurocs(val_targets, probs, labels)
        if not aurocs:
            raise InputError("val has no label with both positives and negatives; nothing to select on")
        mean = float(np.mean(list(aurocs.values())))
        record = {"epoch": epoch, "step": last, "val_auroc_mean": mean, "val_auroc": aurocs,
                  "train_loss": float(np.mean(stats.losses)), "backbone_frozen": frozen}
        result.history.append(record)
        if mean > result.best_val_auroc:  # ties keep the earlier epoch
            result.best_epoch, result.best_val_auroc = epoch, mean
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in classifier.state_dict().items()}
        result.steps, result.seconds = last, time.perf_counter() - start_time
        if save_state is not None:
            save_state(last, classifier, optimizer, {
                "epoch": epoch, "history": copy.deepcopy(result.history), "best_epoch": result.best_epoch,
                "best_val_auroc": result.best_val_auroc, "best_state": result.best_state})
        if on_epoch is not None:
            on_epoch(epoch, record)
    return result
