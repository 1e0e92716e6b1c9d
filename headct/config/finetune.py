"""Sections of fine-tuning and its users: ``finetune``, ``tune`` (Optuna over it) and ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from headct.config.base import Label, Section

MAX_ATTENTION_HEADS = 64  # bound of finetune.attention_heads (the job also needs it to divide the encoder width)
# The finetune keys `headct tune` searches and writes to the tuned-parameters file. While finetune.tuned_params
# names a file, these come from that file (or --set), never from params.yaml: the loader refuses them there.
TUNED_KEYS = ("backbone_lr", "head_lr", "weight_decay")


class FinetuneConfig(Section):
    """End-to-end fine-tuning of an encoder + head on the split's labels; best epoch chosen on val AUROC.

    `init`: "pretrained" loads `model_dir`; "random" builds the same architecture from a seeded random init (the
    baseline twin). `arch`: "vit" (the encoder of `model_dir`), a MONAI 3D ResNet from scratch
    ("resnet18"/"resnet10", a baseline; `init` is then ignored), or "cnn": a small strided residual CNN with a
    global-max token (`headct.models.cnn`), the supervised ceiling that learns focal findings on CPU budgets; with
    `init: pretrained` it starts from the CNN of `model_dir` (a masked-restoration `mim` run), with `init: random`
    from scratch. Learning rates are peaks of a warm-up + cosine
    schedule (per optimizer step). A tuned-parameters file (`tuned_params`, written by `headct tune`), when it
    exists, sets its keys and is overridden by --set (DESIGN.md precedence; see `load_params`); while
    `tuned_params` names one, params.yaml may not set TUNED_KEYS (refused, so no value is silently ignored).
    """

    splits: Path = Field(Path("data/splits/synth"), json_schema_extra={"trajectory": False})
    model_dir: Path = Path("models/mae")
    init: Literal["pretrained", "random"] = "pretrained"
    arch: Literal["vit", "resnet18", "resnet10", "cnn"] = "vit"
    # the classifier directory `headct predict` loads
    out_dir: Path = Field(Path("models/classifier"), json_schema_extra={"trajectory": False})
    report_dir: Path = Field(Path("reports/finetune"), json_schema_extra={"trajectory": False})
    # last epoch's state (atomic); None: none kept
    checkpoint_dir: Path | None = Field(Path("checkpoints/finetune"), json_schema_extra={"trajectory": False})
    tuned_params: Path | None = Field(Path("params/tuned/finetune.yaml"), json_schema_extra={"trajectory": False})
    # MLflow registered model the classifier becomes a version of (description: the validation gate's summary under
    # predict's default gate); None: not registered
    register_as: str | None = Field("headct-classifier", json_schema_extra={"trajectory": False})
    labels: list[Label] | None = None  # None: every label column of train.csv; one label = a single-label run
    # The split files trained on: [train], or [train, pool] for the supervised ceiling (abundant labels of the
    # same data: the pool's labels, which no other labelled-data job reads; pool.csv from split.labelled_train).
    # With the pool, the predictions' model name is "ceiling_<model>" (e.g. ceiling_resnet18).
    train_splits: list[Literal["train", "pool"]] = Field(default_factory=lambda: ["train"], min_length=1)
    min_positives: int = Field(2, ge=1)  # per split (train, val); fewer -> label left out with a message
    # attentive = learned-query attention head; residual (arch cnn): the masked-restoration model of `model_dir`
    # (init pretrained) or its seeded random-init twin (init random), read out by its restoration residual as
    # `headct extract`'s pool `residual` does, fine-tuned end to end through that read-out
    pool: Literal["cls", "mean", "attentive", "residual"] = "mean"
    # heads of the attentive head: must divide the encoder width (checked by the job before training)
    attention_heads: int = Field(4, ge=1, le=MAX_ATTENTION_HEADS)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(8, ge=1)
    accum_steps: int = Field(1, ge=1)
    backbone_lr: float = Field(1e-4, ge=0, le=1.0)
    head_lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.05, ge=0)
    # ViT backbones only (refused for a ResNet): stochastic depth, rising linearly over the blocks to this rate
    # (timm/DeiT), and layer-wise lr decay (block i of depth D gets backbone_lr * layer_decay ** (D - i); BEiT/MAE
    # fine-tuning use 0.65-0.75). 0 / None: off.
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    freeze_backbone_epochs: int = Field(0, ge=0)  # first epochs train the head only
    class_weighted_loss: bool = True  # BCE pos_weight = negatives / positives in train, per label
    balanced_sampling: bool = False  # draw scans with weights that balance each label's classes
    grad_clip: float | None = Field(3.0, gt=0)
    flip_lr: bool = True
    jitter_hu: float = Field(5.0, ge=0, le=100)
    jitter_scale: float = Field(0.02, ge=0, le=0.5)
    eval_batch_size: int = Field(16, ge=1)
    bootstrap: int = Field(1000, ge=10, json_schema_extra={"trajectory": False})
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra={"trajectory": False})
    threads: int | None = Field(None, ge=1, json_schema_extra={"trajectory": False})
    amp: Literal["auto", "bf16", "off"] = "auto"
    # Fine-tune a model directory whose recorded preprocessing version is missing or differs from the split's store
    # (a warning instead of an error); allows a run, changes nothing in it.
    allow_preprocess_mismatch: bool = Field(False, json_schema_extra={"trajectory": False})

    @field_validator("labels", mode="before")
    @classmethod
    def _one_label(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("train_splits")
    @classmethod
    def _distinct_splits(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"train_splits names a split twice: {v}")
        return v

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> FinetuneConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must divide batch_size={self.batch_size}")
        if self.batch_size // self.accum_steps < 2:
            raise ValueError("micro-batches need >= 2 scans (batch_size / accum_steps): BatchNorm in the head "
                             "and ResNet cannot normalise over one")
        if self.pool == "residual" and self.arch != "cnn":
            raise ValueError(f"pool residual reads the small CNN's masked restoration (arch cnn), not arch {self.arch}")
        if self.arch != "vit" and (self.drop_path_rate > 0 or self.layer_decay is not None):
            raise ValueError(f"drop_path_rate and layer_decay apply to ViT backbones only (arch={self.arch})")
        return self


class CeilingConfig(FinetuneConfig):
    """The supervised ceiling (`headct ceiling`): the fine-tuning job with abundant labels, a model from scratch
    trained on the labels of train + pool (pool.csv, from split.labelled_train), which no labelled-data job of
    the encoder arms reads. What the arms are measured against: "how far is few-label detection from what this
    data allows?". Defaults: the small CNN (`headct.models.cnn`, global-max token, read by the "cls" head), which
    learns focal findings in minutes on 2 CPU cores; any `finetune` setting can be set here (e.g. arch: vit).
    """

    arch: Literal["vit", "resnet18", "resnet10", "cnn"] = "cnn"
    init: Literal["pretrained", "random"] = "random"
    pool: Literal["cls", "mean", "attentive"] = "cls"
    train_splits: list[Literal["train", "pool"]] = Field(default_factory=lambda: ["train", "pool"], min_length=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    backbone_lr: float = Field(1e-3, ge=0, le=1.0)
    out_dir: Path = Field(Path("models/ceiling"), json_schema_extra={"trajectory": False})
    report_dir: Path = Field(Path("reports/ceiling"), json_schema_extra={"trajectory": False})
    checkpoint_dir: Path | None = Field(Path("checkpoints/ceiling"), json_schema_extra={"trajectory": False})
    tuned_params: Path | None = Field(None, json_schema_extra={"trajectory": False})
    register_as: str | None = Field(None, json_schema_extra={"trajectory": False})


class TuneConfig(Section):
    """Optuna TPE over the fine-tuning learning rates and weight decay; trials start from the `finetune` section.

    Each trial fine-tunes for `epochs` epochs, reports mean val AUROC every epoch to a MedianPruner, and is an
    MLflow child run. `storage` None means `sqlite:///<project root>/optuna.db`; any RDB URL (PostgreSQL) or
    `journal:PATH` (Optuna's JournalStorage on a shared file; never SQLite on NFS) lets many processes share one study. The best values go to `best_params` (what finetune.tuned_params reads).
    """

    storage: str | None = Field(None, json_schema_extra={"trajectory": False})
    # None: "headct-finetune-<key>", the key hashing the search space, the finetune settings, the model's weights and
    # the split files, so a changed input (e.g. under `dvc repro`) starts a fresh study while workers on the same
    # inputs share one. A fixed name always means that study.
    study_name: str | None = Field(None, json_schema_extra={"trajectory": False})
    load_if_exists: bool = Field(True, json_schema_extra={"trajectory": False})
    # trials this process runs (several processes add up)
    n_trials: int = Field(10, ge=1, json_schema_extra={"trajectory": False})
    epochs: int = Field(2, ge=1)  # per trial
    backbone_lr: tuple[float, float] = (1e-5, 1e-3)  # log-uniform range
    head_lr: tuple[float, float] = (1e-4, 1e-2)  # log-uniform range
    weight_decay: tuple[float, float] = (0.0, 0.1)  # uniform range
    seed: int | None = Field(0, ge=0)  # TPE sampler seed (None: random)
    n_startup_trials: int = Field(5, ge=0)  # TPE: random trials before modelling
    pruner_startup_trials: int = Field(2, ge=0)  # MedianPruner: trials finished before pruning starts
    pruner_warmup_epochs: int = Field(1, ge=0)  # MedianPruner: epochs of a trial before it may be pruned
    best_params: Path = Field(Path("params/tuned/finetune.yaml"), json_schema_extra={"trajectory": False})
    report_dir: Path = Field(Path("reports/tune"), json_schema_extra={"trajectory": False})

    @field_validator("backbone_lr", "head_lr", "weight_decay")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] < 0 or v[0] > v[1]:
            raise ValueError(f"expected a range [low, high] with 0 <= low <= high, got {list(v)}")
        return v

    @field_validator("backbone_lr", "head_lr")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {list(v)}")
        return v


class PredictConfig(Section):
    """`headct predict STUDY`: one study through ingest QC and a fine-tuned classifier, to the terminal; decisions
    only for labels the validation gate passes (the others show their probability and val AUROC, no decision)."""

    study: Path | None = None  # a DICOM folder or a NIfTI file (the positional argument)
    classifier_dir: Path = Path("models/classifier")
    keep: Literal["best", "all"] = "best"  # score the preferred series, or every series passing QC
    out: Path | None = None  # also write the result as JSON here (one-off ids only)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The validation gate (headct/eval/validation_gate.py): a finding gets a decision only when its val AUROC's
    # patient-bootstrap 95% CI lower bound is above min_auroc_low and val held >= min_val_positives positives.
    min_auroc_low: float = Field(0.7, ge=0.0, lt=1.0)
    min_val_positives: int = Field(20, ge=1)
