"""The ``pretrain`` section and its ``dino`` sub-section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from headct.config.base import DEFAULT_WINDOWS, Section, Window


class DinoConfig(Section):
    """DINO (Caron et al. 2021) settings; used when `pretrain.method` is dino. Sizes in voxels of the store grid."""

    out_dim: int = Field(4096, ge=16)  # prototypes of the projection head (65,536 in the paper; 4,096 suits CT)
    hidden_dim: int = Field(1024, ge=8)
    bottleneck_dim: int = Field(256, ge=8)
    global_crops: int = Field(2, ge=2, le=2)  # the teacher sees two global crops
    local_crops: int = Field(6, ge=0, le=16)
    global_size: int | None = Field(None, ge=2)  # output edge of a global crop; None: the store grid's edge
    local_size: int | None = Field(None, ge=2)  # None: half the global size (rounded to the patch)
    # Share of the volume's voxels a crop box covers (DINO's area scale, in 3D); box centres lie inside the head.
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    teacher_momentum: float = Field(0.996, ge=0.0, lt=1.0)  # cosine schedule from this to 1.0
    teacher_temp: float = Field(0.07, gt=0.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_temp_frac: float = Field(0.1, ge=0.0, lt=1.0)  # share of the steps for the temperature ramp
    student_temp: float = Field(0.1, gt=0.0)
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    freeze_last_layer_epochs: int = Field(1, ge=0)  # epochs (passes over the training scans) with the last layer frozen
    weight_decay_end: float = Field(0.4, ge=0.0)  # cosine from pretrain.weight_decay to this
    koleo_weight: float = Field(0.0, ge=0.0)  # KoLeo regulariser (DINOv2); 0 = off


class PretrainConfig(Section):
    """Self-supervised pre-training of the encoder: MAE, DINO or masked restoration (mim), one process or many
    under `torchrun`.

    Under torchrun, `batch_size` is per process (each rank reads its own share of every step); `samples` counts
    all ranks, so the steps are samples // (batch_size * world size).
    """

    splits: Path = Field(Path("data/splits/synth"), json_schema_extra={"trajectory": False})
    model_dir: Path = Field(Path("models/mae"), json_schema_extra={"trajectory": False})
    # Resume state lives outside DVC outputs (DVC deletes outputs before re-running a stage).
    checkpoint_dir: Path = Field(Path("checkpoints/pretrain"), json_schema_extra={"trajectory": False})
    report_dir: Path = Field(Path("reports/pretrain"), json_schema_extra={"trajectory": False})
    # mae / dino: a ViT (`arch` tiny, small or base); mim: masked restoration of the small 3D CNN (`arch` cnn,
    # headct/models/restoration.py: cubes of 8 voxels hidden at `mask_ratio`; `patch_size` does not apply)
    method: Literal["mae", "dino", "mim"] = "mae"
    arch: Literal["tiny", "small", "base", "cnn"] = "tiny"
    num_registers: int = Field(0, ge=0, le=64)  # register tokens (Darcet et al. 2024); 0 = none
    # 64^3 demo: patch 16 gives 4^3 = 64 tokens; patch 8 (512 tokens, as FM-HCT at 96^3 / 12) is ~3x slower on CPU.
    patch_size: int = Field(16, ge=2, le=64)
    use_val: bool = True  # pre-train on train+val patients (never test)
    # Also pre-train on the split's pool.csv (the unlabelled train patients of `split.labelled_train`) when the
    # split has one; a split without a pool gives the same training scans either way. Not a trajectory setting:
    # the run key already hashes the training scan ids, which say whether the pool was read.
    pool: bool = Field(True, json_schema_extra={"trajectory": False})
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # MAE: share of patches hidden; mim: share of cubes
    norm_pix_loss: bool = False
    decoder_dim: int | None = Field(None, ge=6)  # None: half the encoder width
    decoder_depth: int = Field(2, ge=1, le=16)
    batch_size: int = Field(8, ge=1, le=4096)  # 8: most volumes/s on 2 CPU cores (4, 16, 32: 9-23 % fewer)
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step (must divide batch_size)
    samples: int = Field(20_000, ge=1)  # total training samples seen (steps = samples // batch_size)
    # Peak lr for batch_size 8: 2,500 steps of 64^3 volumes on 2 CPU cores (demo). MAE's 1.5e-4 x batch/256
    # gives 4.7e-6, far too small for a short run. Held-out loss after 20k samples: 1e-3 best, 2e-3 / 4e-3 within
    # 2 / 4 %, 1.5e-4 17 % worse.
    lr: float = Field(1e-3, gt=0, le=1.0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    grad_clip: float | None = Field(3.0, gt=0)
    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    flip_lr: bool = True  # left-right flip augmentation
    jitter_hu: float = Field(5.0, ge=0, le=100)  # per-volume HU offset, uniform in [-jitter_hu, jitter_hu]
    jitter_scale: float = Field(0.02, ge=0, le=0.5)  # per-volume HU gain, uniform in 1 +- jitter_scale
    # DataLoader processes; 0 reads in the training process
    workers: int = Field(0, ge=0, le=64, json_schema_extra={"trajectory": False})
    seed: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1, json_schema_extra={"trajectory": False})
    checkpoint_every: int = Field(200, ge=1, json_schema_extra={"trajectory": False})
    eval_volumes: int = Field(32, ge=1)  # held-out val volumes for the reconstruction-loss check
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra={"trajectory": False})
    threads: int | None = Field(None, ge=1, json_schema_extra={"trajectory": False})
    # Mixed precision: "auto" = bf16 autocast on GPU, fp32 on CPU (CPU bf16 is slower than fp32 here).
    amp: Literal["auto", "bf16", "off"] = "auto"
    # torch.compile the training step (GPU; minutes of warm-up, then faster steps)
    compile: bool = Field(False, json_schema_extra={"trajectory": False})
    # a reconstruction PNG to MLflow every N steps (None: end only)
    figure_every: int | None = Field(None, ge=1, json_schema_extra={"trajectory": False})
    # Registered model name for the pyfunc of each finished run (None: don't register); `champion` alias moves
    # to the newest version whose held-out loss improved.
    register_as: str | None = Field("headct-encoder", json_schema_extra={"trajectory": False})
    dino: DinoConfig = Field(default_factory=DinoConfig)

    @model_validator(mode="after")
    def _method_fits_arch(self) -> PretrainConfig:
        if (self.method == "mim") != (self.arch == "cnn"):
            raise ValueError(f"pretrain.method={self.method} does not fit pretrain.arch={self.arch}: masked "
                             "restoration (mim) trains the small CNN (arch cnn); mae and dino train a ViT (tiny, "
                             "small, base)")
        return self

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> PretrainConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must divide batch_size={self.batch_size}")
        if self.samples < self.batch_size:
            raise ValueError(f"samples={self.samples} is less than one batch (batch_size={self.batch_size})")
        return self
