"""Self-supervised pretext tasks as the pre-training job sees them: one object per method (MAE, DINO, mim).

A task owns its model (the encoder plus what only pre-training needs: MAE's decoder, DINO's heads and teacher),
turns a batch of int16 HU volumes into a loss on the training device (augmentation, crops, windows and masks
drawn from generators seeded by the global step and rank, so a resumed or re-run job repeats exactly), scores a
fixed held-out set, and draws its figures. The pre-training job (`pipelines/pretrain.py`) is method-agnostic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from headct.data.augment import augment_hu
from headct.data.windows import hu_to_windows
from headct.models.vit import ViT3D
from headct.train.engine import step_generator

EVAL_STREAM = 1_000_003  # generator stream of held-out masks/crops (training uses small stream numbers)
# Below this feature spread (see DinoTask.feature_spread) a DINO encoder counts as collapsed. Random unit vectors
# in D dimensions spread by ~1/sqrt(D) per dimension (0.07 at D = 192), so 1e-3 is far below any useful encoder.
COLLAPSE_SPREAD = 1e-3


def stream(rank: int, micro: int, accum_steps: int, kind: int) -> int:
    """Generator stream for (rank, micro-batch, kind of randomness): distinct per rank so ranks draw different
    augmentations; rank 0 keeps the single-process numbering (0, 1 for micro-batch 0)."""
    return 2 * (rank * accum_steps + micro) + kind


class PretextTask(Protocol):
    method: str
    model: nn.Module  # what the optimizer trains (unwrapped); DDP/compile wrap it in the job
    encoder: ViT3D  # what the model directory keeps
    # True when the held-out loss depends on state that training moves besides the weights (DINO's centre): the
    # job then scores the start at the END, on the seeded initial weights with the final state
    # (`heldout_loss_of_initial`), so that start and end measure the same loss; False: at step 0.
    start_scored_at_end: bool

    def loss(self, model: nn.Module, hu: torch.Tensor, step: int, micro: int) -> torch.Tensor: ...
    def heldout_loss(self, hu: torch.Tensor) -> float: ...
    def heldout_loss_of_initial(self, initial: PretextTask, hu: torch.Tensor) -> float: ...
    def after_backward(self, step: int) -> None: ...
    def after_update(self, step: int) -> None: ...
    def snapshot(self, hu: torch.Tensor, path: Path, title: str | None = None) -> Path | None: ...
    def metric_name(self) -> str: ...
    def feature_spread(self, hu: torch.Tensor) -> float | None: ...
    def extra_weights(self) -> dict[str, nn.Module]: ...  # model-directory files besides the encoder's weights


class MaeTask:
    """MAE: flip/intensity augmentation, windows, random masking, masked-patch MSE.

    Args:
        cfg: the `pretrain` section (mask ratio, decoder, windows, augmentation, seed, batch size).
        encoder: the ViT3D to pre-train.
        device: training device.
        rank, accum_steps: this process's rank and the micro-batches per step (for generator streams).
    """

    method = "mae"
    start_scored_at_end = False  # the masked-patch MSE depends on the weights and the fixed masks only

    def __init__(self, cfg: Any, encoder: ViT3D, device: torch.device, rank: int = 0) -> None:
        from headct.models.mae import MAE

        self.cfg, self.device, self.rank = cfg, device, rank
        self.model = MAE(encoder, cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth,
                         norm_pix_loss=cfg.norm_pix_loss).to(device)
        self.encoder = self.model.encoder

    def metric_name(self) -> str:
        return "masked-patch MSE" + (" (normalised targets)" if self.cfg.norm_pix_loss else "")

    def loss(self, model: nn.Module, hu: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        cfg = self.cfg
        hu = hu.to(self.device, non_blocking=True)
        aug = step_generator(cfg.seed, step, stream(self.rank, micro, cfg.accum_steps, 0))
        hu = augment_hu(hu, aug, cfg.flip_lr, cfg.jitter_hu, cfg.jitter_scale)
        masks = step_generator(cfg.seed, step, stream(self.rank, micro, cfg.accum_steps, 1))
        return self.model_loss(model, hu_to_windows(hu, cfg.windows), masks)

    @staticmethod
    def model_loss(model: nn.Module, windows: torch.Tensor, masks: torch.Generator) -> torch.Tensor:
        """The pretext model's loss on windowed volumes (MAE returns it with its prediction and masking)."""
        loss, _, _ = model(windows, masks)
        return loss

    @torch.no_grad()
    def heldout_loss(self, hu: torch.Tensor) -> float:
        """Mean masked-region MSE over held-out volumes (B, X, Y, Z) int16: no augmentation, the same masks
        on every call (same seed and chunking)."""
        generator = step_generator(self.cfg.seed, 0, EVAL_STREAM)
        total, was_training = 0.0, self.model.training
        self.model.eval()
        for chunk in hu.split(self.cfg.batch_size):
            loss = self.model_loss(self.model, hu_to_windows(chunk.to(self.device), self.cfg.windows), generator)
            total += loss.item() * len(chunk)  # every volume has the same number of masked patches / cubes
        self.model.train(was_training)
        return total / len(hu)

    def heldout_loss_of_initial(self, initial: PretextTask, hu: torch.Tensor) -> float:
        return initial.heldout_loss(hu)

    def after_backward(self, step: int) -> None:
        return None

    def after_update(self, step: int) -> None:
        return None

    def extra_weights(self) -> dict[str, nn.Module]:
        return {}  # the decoder serves pre-training only

    def feature_spread(self, hu: torch.Tensor) -> float | None:
        return None  # MAE cannot collapse: a constant encoder cannot reconstruct the masked voxels

    @torch.no_grad()
    def snapshot(self, hu: torch.Tensor, path: Path, title: str | None = None) -> Path:
        """Input / masked / reconstruction slices of the first held-out volume (first window) as a PNG."""
        from headct.train.plots import plot_reconstruction

        was_training = self.model.training
        self.model.eval()
        x = hu_to_windows(hu[:1].to(self.device), self.cfg.windows)
        mask, recon = self.model.reconstruct(x, step_generator(self.cfg.seed, 0, EVAL_STREAM))
        self.model.train(was_training)
        vol, mask, recon = (t[0].float().cpu().numpy() for t in (x, mask, recon))
        return plot_reconstruction(vol[0], mask[0], recon[0], path, self.cfg.windows[0].name, title=title)


class RestorationTask(MaeTask):
    """Masked restoration of the small 3D CNN (headct/models/restoration.py): the same augmentation, windows and
    seeded masks as MAE, cubes instead of patches; the model directory also keeps the restoration head
    (`extra_weights`), which the residual read-out of `headct extract` needs."""

    method = "mim"

    def __init__(self, cfg: Any, encoder: nn.Module, device: torch.device, rank: int = 0) -> None:
        from headct.models.restoration import MaskedRestoration

        self.cfg, self.device, self.rank = cfg, device, rank
        self.model = MaskedRestoration(encoder, cfg.mask_ratio).to(device)
        self.encoder = self.model.encoder

    def metric_name(self) -> str:
        return "masked-cube MSE"

    @staticmethod
    def model_loss(model: nn.Module, windows: torch.Tensor, masks: torch.Generator) -> torch.Tensor:
        return model(windows, masks)  # MaskedRestoration returns the loss alone

    def extra_weights(self) -> dict[str, nn.Module]:
        from headct.models.model_dir import RESTORATION_HEAD

        return {RESTORATION_HEAD: self.model.head}


class DinoTask:
    """DINO: multi-crop inside the head (2 global + local views), windows, student/teacher self-distillation.

    Schedules are pure functions of the global step: teacher temperature warm-up, teacher momentum (cosine to 1),
    and the head's last layer frozen for the first `freeze_last_layer_epochs` epochs. The saved encoder is the
    teacher's (the EMA network DINO evaluates); the held-out loss is the DINO cross-entropy on fixed crops of the
    held-out volumes at the final teacher temperature, centred by the current centre without moving it. The
    centre is part of the loss and training moves it (from 0), so the start of a run is scored at the end with the
    final centre (`heldout_loss_of_initial`): a zero-centre start against a trained-centre end would compare two
    different losses (the registry's champion rule compares them).
    """

    method = "dino"
    start_scored_at_end = True

    def __init__(
        self, cfg: Any, encoder: ViT3D, device: torch.device, rank: int, total_steps: int, steps_per_epoch: int
    ) -> None:
        from headct.models.dino import DINO

        d = cfg.dino
        self.cfg, self.d, self.device, self.rank = cfg, d, device, rank
        self.total_steps, self.steps_per_epoch = total_steps, max(1, steps_per_epoch)
        self.model = DINO(encoder, d.out_dim, d.hidden_dim, d.bottleneck_dim, student_temp=d.student_temp,
                          center_momentum=d.center_momentum, koleo_weight=d.koleo_weight).to(device)
        self.encoder = self.model.teacher.encoder
        p = encoder.patch_size
        built = tuple(g * p for g in encoder.grid)
        self.global_size = (d.global_size,) * 3 if d.global_size else built
        local = d.local_size or max(p, round(min(self.global_size) / 2 / p) * p)
        self.local_size = (local,) * 3
        if any(s % p for s in (*self.global_size, *self.local_size)):
            raise ValueError(f"DINO crop sizes {self.global_size} / {self.local_size} must be multiples of the "
                             f"patch size {p}")
        self.temp_warmup = round(d.warmup_teacher_temp_frac * total_steps)

    def metric_name(self) -> str:
        return "DINO cross-entropy"

    def views(self, hu: torch.Tensor, generator: torch.Generator, augment: bool = True) -> tuple[list, list]:
        """HU batch -> (global views, local views), each a list of windowed (B, C, X, Y, Z) tensors."""
        from headct.data.crops import multi_crop

        cfg, d = self.cfg, self.d
        crops = multi_crop(
            hu.to(self.device, non_blocking=True), generator, d.global_crops, self.global_size, d.local_crops,
            self.local_size, d.global_scale, d.local_scale, flip_lr=augment and cfg.flip_lr,
            jitter_hu=cfg.jitter_hu if augment else 0.0, jitter_scale=cfg.jitter_scale if augment else 0.0,
            patch_size=self.encoder.patch_size,
        )
        return ([hu_to_windows(c, cfg.windows) for c in crops.global_crops],
                [hu_to_windows(c, cfg.windows) for c in crops.local_crops])

    def teacher_temp(self, step: int) -> float:
        from headct.train.schedules import teacher_temperature

        return teacher_temperature(step, self.temp_warmup, self.d.warmup_teacher_temp, self.d.teacher_temp)

    def loss(self, model: nn.Module, hu: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        generator = step_generator(self.cfg.seed, step, stream(self.rank, micro, self.cfg.accum_steps, 0))
        global_views, local_views = self.views(hu, generator)
        return model(global_views, local_views, self.teacher_temp(step))["loss"]

    def after_backward(self, step: int) -> None:
        self.model.cancel_last_layer_grad(step // self.steps_per_epoch, self.d.freeze_last_layer_epochs)

    def after_update(self, step: int) -> None:
        from headct.train.schedules import teacher_momentum

        self.model.update_teacher(teacher_momentum(step, self.total_steps, self.d.teacher_momentum))

    @torch.no_grad()
    def heldout_loss(self, hu: torch.Tensor) -> float:
        generator = step_generator(self.cfg.seed, 0, EVAL_STREAM)
        total, was_training = 0.0, self.model.training
        self.model.eval()
        for chunk in hu.split(self.cfg.batch_size):
            global_views, local_views = self.views(chunk, generator, augment=False)
            out = self.model(global_views, local_views, self.d.teacher_temp, update_center=False)
            total += out["dino"].item() * len(chunk)
        self.model.train(was_training)
        return total / len(hu)

    @torch.no_grad()
    def heldout_loss_of_initial(self, initial: PretextTask, hu: torch.Tensor) -> float:
        """The held-out loss of `initial` (a task built from the same seed: the run's starting weights) scored
        with this task's centre, i.e. the same loss as this task's `heldout_loss`."""
        if not isinstance(initial, DinoTask):
            raise TypeError(f"a DINO start is scored by a DinoTask, got {type(initial).__name__}")
        initial.model.loss_fn.center.copy_(self.model.loss_fn.center)
        return initial.heldout_loss(hu)

    @torch.no_grad()
    def extra_weights(self) -> dict[str, nn.Module]:
        return {}  # the model directory keeps the teacher encoder only

    def feature_spread(self, hu: torch.Tensor) -> float:
        """Mean over dimensions of the std across held-out volumes of the teacher encoder's L2-normalised CLS
        features. A collapsed DINO (every input mapped to one point) scores ~0 while its loss can still fall, so
        the registry's `champion` rule checks this too (COLLAPSE_SPREAD)."""
        was_training = self.model.training
        self.model.eval()
        feats = [F.normalize(self.encoder.forward_features(hu_to_windows(chunk.to(self.device), self.cfg.windows))
                             [:, 0].float(), dim=-1) for chunk in hu.split(self.cfg.batch_size)]
        self.model.train(was_training)
        return float(torch.cat(feats).std(dim=0).mean()) if len(hu) > 1 else float("nan")

    @torch.no_grad()
    def snapshot(self, hu: torch.Tensor, path: Path, title: str | None = None) -> Path:
        """Mid-axial slices of the global and local views of the first held-out volume (first window)."""
        from headct.train.plots import plot_views

        global_views, local_views = self.views(hu[:1], step_generator(self.cfg.seed, 0, EVAL_STREAM), False)
        return plot_views([v[0, 0].float().cpu().numpy() for v in global_views],
                          [v[0, 0].float().cpu().numpy() for v in local_views], path,
                          title or f"DINO views of a held-out volume ({self.cfg.windows[0].name} window)")


def build_task(
    cfg: Any, encoder: ViT3D, device: torch.device, rank: int = 0, *, total_steps: int, steps_per_epoch: int
) -> PretextTask:
    """The task for `cfg.method` (`total_steps` and `steps_per_epoch` drive DINO's schedules)."""
    if cfg.method == "mae":
        return MaeTask(cfg, encoder, device, rank)
    if cfg.method == "dino":
        return DinoTask(cfg, encoder, device, rank, total_steps, steps_per_epoch)
    if cfg.method == "mim":
        return RestorationTask(cfg, encoder, device, rank)
    raise ValueError(f"unknown pre-training method {cfg.method!r}")
