"""Pydantic models for every ``params.yaml`` section, and the loader that resolves them.

Precedence, lowest first: code defaults < params.yaml < tuned-parameters file (fine-tuning only)
< ``--set section.key=value``. Every model forbids unknown keys, so a typo is an error that names the key
before any work starts. This module imports only pydantic/yaml so ``headct --help`` stays instant.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

# The canonical label vocabulary (DESIGN.md, "Labels"): CQ500's columns plus Tumor.
LABELS: tuple[str, ...] = (
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH",
    "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
    "Fracture", "CalvarialFracture", "OtherFracture",
    "MassEffect", "MidlineShift", "Tumor",
)
Label = Literal[
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH",
    "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
    "Fracture", "CalvarialFracture", "OtherFracture",
    "MassEffect", "MidlineShift", "Tumor",
]


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------- shared specs
class Window(Section):
    """An HU display window as level/width (HU); mapped to [0, 1] after clipping."""

    name: str
    level: float
    width: float = Field(gt=0)


DEFAULT_WINDOWS: tuple[Window, ...] = (
    Window(name="brain", level=40, width=80),
    Window(name="subdural", level=80, width=200),
    Window(name="bone", level=600, width=2800),
)


class PreprocessSpec(Section):
    """How a source series becomes a canonical volume (DESIGN.md, "Canonical volume").

    Stored in the manifest and in every model directory; ``version`` hashes it so a model can refuse a
    store made with a different recipe.
    """

    shape: tuple[int, int, int] = (96, 96, 96)  # voxels, array axes (x, y, z)
    spacing_mm: float = Field(2.0, gt=0.1, le=10.0)  # isotropic output spacing
    orientation: Literal["RAS"] = "RAS"
    interpolation: Literal["linear"] = "linear"  # trilinear, in float32
    head_localisation: Literal["threshold", "none"] = "threshold"
    # "isotropic": fixed mm grid centred on the head's bounding box (default, keeps anatomy undistorted);
    # "stretch": the seed's crop-to-bounding-box then resize to `shape` (aspect ratio NOT kept).
    fit: Literal["isotropic", "stretch"] = "isotropic"
    clip_hu: tuple[int, int] = (-1024, 3071)
    pad_hu: int = -1024  # air, never 0

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 or s > 1024 for s in v):
            raise ValueError(f"every grid dimension must be in [8, 1024] voxels, got {list(v)}")
        return v

    @property
    def version(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------- sections
class TrackingConfig(Section):
    """MLflow boundary. ``uri`` None means ``sqlite:///<project root>/mlflow.db``."""

    uri: str | None = None
    experiment: str = "headct"
    system_metrics: bool = False


class SynthConfig(Section):
    """The synthetic head-CT generator (the embedded default data set)."""

    out: Path = Path("data/raw/synth")
    n_patients: int = Field(400, ge=2, le=100_000)
    seed: int = Field(0, ge=0)
    matrix: int = Field(256, ge=32, le=512)  # in-plane pixels of the written DICOM series
    pixel_mm: float = Field(0.9, gt=0.2, le=5.0)  # in-plane pixel spacing of the written series
    slice_thickness_mm: float = Field(5.0, gt=0.4, le=10.0)  # the main (thick axial) series
    # Fraction of studies carrying each finding. Defaults: CQ500 (Chilamkurthy et al., Lancet 2018, dataset table,
    # 491 scans, majority of 3 reads): ICH 205, IPH 134, IVH 28, SDH 53, EDH 13, SAH 60, calvarial fracture 34;
    # ChronicBleed, OtherFracture and Tumor are not in that table (our assumptions). Sources, rounding and
    # co-occurrence: headct/data/synth/clinical.py.
    prevalence: dict[str, float] = Field(
        default_factory=lambda: {
            "IPH": 0.273, "IVH": 0.057, "SDH": 0.108, "EDH": 0.026, "SAH": 0.122,
            "ChronicBleed": 0.02, "CalvarialFracture": 0.069, "OtherFracture": 0.015, "Tumor": 0.03,
        }
    )
    # Fraction of studies with any haemorrhage (CQ500: 205/491); the haemorrhage kinds' prevalences are then
    # spread over these studies only, at least one each. None: every finding is assigned independently.
    ich_prevalence: float | None = Field(0.418, ge=0.0, le=1.0)
    extra_series_fraction: float = Field(0.15, ge=0.0, le=1.0)  # studies with thin/bone/localizer series too
    reader_disagreement: float = Field(0.05, ge=0.0, le=0.5)  # chance that one reader flips a label
    workers: int = Field(2, ge=1, le=256)
    montage: Path = Path("reports/synth/montage.png")

    @field_validator("prevalence")
    @classmethod
    def _known_findings(cls, v: dict[str, float]) -> dict[str, float]:
        for key, p in v.items():
            if key not in LABELS:
                hint = difflib.get_close_matches(key, LABELS, n=1)
                raise ValueError(
                    f"unknown finding {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; allowed: {', '.join(LABELS)}"
                )
            if key in ("ICH", "BleedLocation-Left", "BleedLocation-Right", "Fracture", "MassEffect", "MidlineShift"):
                raise ValueError(
                    f"{key} is derived from the findings, so it has no prevalence of its own; set the findings' "
                    "(IPH, IVH, SDH, EDH, SAH, ChronicBleed, CalvarialFracture, OtherFracture, Tumor)"
                )
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"prevalence of {key} must be in [0, 1], got {p}")
        return v

    @model_validator(mode="after")
    def _subtypes_fit_ich(self) -> SynthConfig:
        if self.ich_prevalence is not None:
            bleeds = {k: self.prevalence.get(k, 0.0) for k in ("IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed")}
            over = [k for k, p in bleeds.items() if p > self.ich_prevalence]
            if over or (self.ich_prevalence > 0 and sum(bleeds.values()) < self.ich_prevalence):
                raise ValueError(
                    f"ich_prevalence={self.ich_prevalence} needs every haemorrhage kind's prevalence <= it and their "
                    f"sum >= it (each ICH study has at least one kind); got {bleeds}. Set ich_prevalence: null to "
                    "assign every finding independently")
        return self


class QcRules(Section):
    """Series quality control and acceptance rules (`ingest.qc`), head-CT defaults.

    Every rule that rejects a series has its own reason code in rejects.csv (docs/contracts.md). Patterns are
    Python regular expressions matched case-insensitively anywhere in the text.
    """

    min_slices: int = Field(10, ge=2)
    # Extent along the slice normal, first to last slice centre. A brain is ~120 mm, a whole head 150-200 mm;
    # a posterior-fossa-only or single-slab series is shorter and would centre the grid on a fragment.
    min_coverage_mm: float = Field(80.0, ge=0.0)
    # A step wider than this many times the median slice step is a gap (missing images) -> `missing_slices`.
    max_gap_factor: float = Field(2.0, gt=1.0)
    # Slice normal within this angle of the patient's head-foot axis: axial or oblique (resampled);
    # beyond it: sagittal/coronal -> `non_axial`.
    max_oblique_deg: float = Field(45.0, ge=0.0, le=90.0)
    # Gantry tilt (slice positions advance at an angle to the slice normal): corrected by resampling at the true
    # slice positions, or rejected. A tilt beyond `max_tilt_deg` is always rejected (`gantry_tilt`).
    gantry_tilt: Literal["correct", "reject"] = "correct"
    max_tilt_deg: float = Field(35.0, ge=0.0, lt=90.0)
    # Contrast-enhanced series (ContrastBolusAgent set, or "post contrast"/"C+" in the description): the default
    # data set is non-contrast head CT, so they are rejected (`contrast`); "allow" only ranks them lower.
    contrast: Literal["reject", "allow"] = "reject"
    # ConvolutionKernel rules (`kernel`): a kernel matching any deny pattern is rejected; with an allow list, a kernel
    # matching none of it is rejected. Bone kernels are not rejected by default, only ranked below soft-tissue ones.
    kernel_allow: list[str] = Field(default_factory=list)
    kernel_deny: list[str] = Field(default_factory=list)
    # KVP outside [lo, hi] (`kvp`); a series without KVP passes. Head CT runs at 70-150 kV.
    kvp_range: tuple[float, float] | None = (70.0, 150.0)
    # Study or series descriptions of other protocols (`description`): angiography, perfusion, venography.
    description_deny: list[str] = Field(
        default_factory=lambda: [r"ANGIO", r"\bCTA\b", r"PERFUSION", r"\bCTP\b", r"VENOGR"]
    )
    # The seed's filter-criteria CSV (columns `Study Description, KVP, Convolution Kernel`): an allow-list; a series
    # matching no row is rejected (`criteria`). Relative to the project root like every params path.
    criteria_csv: Path | None = None
    # Selection preference (not a rejection): slice thickness within this range ranks higher.
    thickness_range_mm: tuple[float, float] = (0.5, 5.0)

    @field_validator("kernel_allow", "kernel_deny", "description_deny")
    @classmethod
    def _valid_patterns(cls, v: list[str]) -> list[str]:
        import re

        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
        return v

    @field_validator("kvp_range", "thickness_range_mm")
    @classmethod
    def _increasing(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(v)}")
        return v


class IngestConfig(Section):
    """DICOM/NIfTI -> canonical store (manifest, rejects, labels) + local linkage file."""

    src: Path = Path("data/raw/synth")
    dest: Path = Path("data/store/synth")
    # Labels: a CQ500-style reads.csv (majority of R1-R3), or none (pre-training only data).
    labels: Path | None = Path("data/raw/synth/reads.csv")
    labels_format: Literal["cq500", "none"] = "cq500"
    # Patient key: DICOM PatientID, or the CQ500-layout folder name (`CQ500CT0 CQ500CT0/...` <-> `CQ500-CT-0`).
    patient_key: Literal["dicom", "cq500_folder"] = "cq500_folder"
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    # The pseudonym key comes from HEADCT_PSEUDONYM_KEY or HEADCT_PSEUDONYM_KEY_FILE, never from here;
    # `demo_key: true` allows the fixed, demo-only key when neither is set (synthetic data only).
    demo_key: bool = False
    # Pseudonym <-> source path/UIDs. Kept out of Git, DVC outputs, MLflow and reports. None means
    # `<project root>/private/linkage/<dest folder name>.csv`.
    linkage: Path | None = None
    qc: QcRules = Field(default_factory=QcRules)
    # "best": one series per study, by the documented preference; "all": every series that passes QC.
    keep: Literal["best", "all"] = "best"
    # Worker processes; "auto" = CPU count. Either way capped by memory: available RAM / the largest series'
    # estimated peak (the cap is printed).
    workers: int | Literal["auto"] = "auto"
    # Job arrays: "K/N" converts only the studies whose pseudonym falls in shard K of N (1-based) and writes
    # DEST/shards/<K>of<N>/; `headct ingest merge DEST` joins the shards. None: the whole source.
    shard: str | None = None
    export_nifti: bool = False  # also write DEST/nifti/<scan_id>.nii.gz (the canonical volume with its affine)
    contact_sheet_volumes: int = Field(8, ge=0, le=64)  # volumes shown in <report_dir>/contact_sheet.png
    report_dir: Path = Path("reports/ingest")

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError(f"workers must be 1-256 or 'auto', got {v}")
        return v

    @field_validator("shard")
    @classmethod
    def _shard_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
            raise ValueError(f"shard must be K/N with 1 <= K <= N (e.g. 3/8), got {v!r}")
        return f"{int(parts[0])}/{int(parts[1])}"


class SplitConfig(Section):
    """Patient-disjoint, stratified, seeded train/val/test split in the seed's CSV layout."""

    store: Path = Path("data/store/synth")
    out: Path = Path("data/splits/synth")
    fractions: tuple[float, float, float] = (0.55, 0.15, 0.30)  # train, val, test
    seed: int = Field(0, ge=0)
    report_dir: Path = Path("reports/split")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must be positive and sum to 1, got {list(v)}")
        return v


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
    """Self-supervised pre-training of the encoder: MAE or DINO, one process or many under `torchrun`.

    Under torchrun, `batch_size` is per process (each rank reads its own share of every step); `samples` counts
    all ranks, so the steps are samples // (batch_size * world size).
    """

    splits: Path = Path("data/splits/synth")
    model_dir: Path = Path("models/mae")
    # Resume state lives outside DVC outputs (DVC deletes outputs before re-running a stage).
    checkpoint_dir: Path = Path("checkpoints/pretrain")
    report_dir: Path = Path("reports/pretrain")
    method: Literal["mae", "dino"] = "mae"
    arch: Literal["tiny", "small", "base"] = "tiny"
    num_registers: int = Field(0, ge=0, le=64)  # register tokens (Darcet et al. 2024); 0 = none
    # 64^3 demo: patch 16 gives 4^3 = 64 tokens; patch 8 (512 tokens, as FM-HCT at 96^3 / 12) is ~3x slower on CPU.
    patch_size: int = Field(16, ge=2, le=64)
    use_val: bool = True  # pre-train on train+val patients (never test)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
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
    workers: int = Field(0, ge=0, le=64)  # DataLoader processes; 0 reads in the training process
    seed: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    eval_volumes: int = Field(32, ge=1)  # held-out val volumes for the reconstruction-loss check
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    # Mixed precision: "auto" = bf16 autocast on GPU, fp32 on CPU (CPU bf16 is slower than fp32 here).
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False  # torch.compile the training step (GPU; minutes of warm-up, then faster steps)
    figure_every: int | None = Field(None, ge=1)  # a reconstruction PNG to MLflow every N steps (None: end only)
    # Registered model name for the pyfunc of each finished run (None: don't register); `champion` alias moves
    # to the newest version whose held-out loss improved.
    register_as: str | None = "headct-encoder"
    dino: DinoConfig = Field(default_factory=DinoConfig)

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> PretrainConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must divide batch_size={self.batch_size}")
        if self.samples < self.batch_size:
            raise ValueError(f"samples={self.samples} is less than one batch (batch_size={self.batch_size})")
        return self


class ProbeConfig(Section):
    """Frozen encoder -> linear classifiers per label, pre-trained vs random init, same protocol."""

    splits: Path = Path("data/splits/synth")
    model_dir: Path = Path("models/mae")
    report_dir: Path = Path("reports/probe")
    labels: list[Label] | None = None  # None: every canonical label present in the split files
    min_positives: int = Field(2, ge=1)  # per split; fewer -> label skipped with a message
    bootstrap: int = Field(1000, ge=10)  # patient-level bootstrap resamples for the 95% CIs
    c_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), min_length=1)  # inverse L2 strength, chosen on val AUROC
    batch_size: int = Field(16, ge=1)
    # Scan embedding: "mean" of the patch tokens (default: MAE puts its loss on patches only, so the CLS token
    # learns only indirectly, through the decoder's attention) or the "cls" token (the natural choice after DINO).
    pool: Literal["cls", "mean"] = "mean"
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A feature cache written by `headct extract`: probe every model cached there (pool, batch_size and device
    # are then unused). None: embed here with model_dir and its random-init twin.
    features: Path | None = None


ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ExtractConfig(Section):
    """Embed every scan of the split files once into a feature cache (`<out>/<model>.npz` + `.json`, index.json)
    that probe, few-shot and retrieval read. Models: `pretrained` (model_dir), `random_init` (its seeded twin),
    `hu_histogram` (the non-learned baseline) and any external encoder (name -> "pkg.module:factory")."""

    splits: Path = Path("data/splits/synth")
    model_dir: Path | None = Path("models/mae")  # None: no ViT features (external encoders / histogram only)
    out: Path = Path("data/features/synth")
    random_init: bool = True
    hu_histogram: bool = True
    histogram_bins: int = Field(64, ge=4, le=1024)  # equal-width bins over [-100, 200) HU inside the head
    external: dict[ModelName, str] = Field(default_factory=dict)  # e.g. {"ctfm": "my_pkg.ctfm:make_encoder"}
    pool: Literal["cls", "mean"] = "mean"
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)  # the random-init twin
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("external")
    @classmethod
    def _no_reserved_names(cls, v: dict[str, str]) -> dict[str, str]:
        clash = sorted(set(v) & {"pretrained", "random_init", "hu_histogram"})
        if clash:
            raise ValueError(f"external encoder name(s) {clash} are reserved for the built-in models")
        return v


class FewshotConfig(Section):
    """K positives + K negatives per label (patient-level, without replacement) from train, several seeds,
    logistic regression on cached features (C and threshold chosen on val), scored on test."""

    features: Path = Path("data/features/synth")
    splits: Path = Path("data/splits/synth")
    report_dir: Path = Path("reports/fewshot")
    models: list[ModelName] | None = None  # None: every model in the cache
    labels: list[Label] | None = None  # None: every canonical label present in the split files
    shots: tuple[int, ...] = Field((1, 2, 4, 8, 16), min_length=1)  # K values
    seeds: int = Field(5, ge=1, le=1000)  # seeds 0 .. seeds-1 (each a different patient draw)
    c_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), min_length=1)  # chosen on val AUROC per fit
    min_positives: int = Field(2, ge=1)  # in val and test; fewer -> label skipped with a message

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in v):
            raise ValueError(f"every K must be >= 1, got {list(v)}")
        return tuple(sorted(set(v)))


class RetrievalConfig(Section):
    """Query-by-embedding (cosine) over one split, same-patient scans excluded; mAP per label and model."""

    features: Path = Path("data/features/synth")
    splits: Path = Path("data/splits/synth")
    report_dir: Path = Path("reports/retrieval")
    split: Literal["val", "test"] = "test"
    models: list[ModelName] | None = None  # None: every model in the cache
    labels: list[Label] | None = None
    min_positives: int = Field(2, ge=1)  # positives in the split; fewer -> label skipped with a message


class ExplainConfig(Section):
    """Attention maps (last-block CLS attention, rollout) and occlusion sensitivity, as axial montages per label."""

    splits: Path = Path("data/splits/synth")
    model_dir: Path = Path("models/mae")
    # A fine-tuned classifier directory: picks each label's most confident positive and enables occlusion.
    classifier_dir: Path | None = None
    split: Literal["train", "val", "test"] = "val"  # val by default: test is read once, by the final evaluation
    labels: list[Label] | None = None  # None: every label with a positive scan in the split
    methods: tuple[Literal["cls", "rollout", "occlusion"], ...] = ("cls", "rollout")
    slices: int = Field(6, ge=1, le=16)  # axial slices per row
    baseline_hu: float = Field(30.0, ge=-1024, le=3000)  # occlusion fill (brain parenchyma)
    report_dir: Path = Path("reports/explain")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FinetuneConfig(Section):
    """End-to-end fine-tuning of an encoder + head on the split's labels; best epoch chosen on val AUROC.

    `init`: "pretrained" loads `model_dir`; "random" builds the same architecture from a seeded random init (the
    baseline twin). `arch`: "vit" (the encoder of `model_dir`), or a MONAI 3D ResNet from scratch
    ("resnet18"/"resnet10", a baseline; `init` is then ignored). Learning rates are peaks of a warm-up + cosine
    schedule (per optimizer step). A tuned-parameters file (`tuned_params`, written by `headct tune`), when it
    exists, overrides params.yaml and is overridden by --set (DESIGN.md precedence; see `load_params`).
    """

    splits: Path = Path("data/splits/synth")
    model_dir: Path = Path("models/mae")
    init: Literal["pretrained", "random"] = "pretrained"
    arch: Literal["vit", "resnet18", "resnet10"] = "vit"
    out_dir: Path = Path("models/classifier")  # the classifier directory `headct predict` loads
    report_dir: Path = Path("reports/finetune")
    checkpoint_dir: Path | None = Path("checkpoints/finetune")  # last epoch's state (atomic); None: none kept
    tuned_params: Path | None = Path("params/tuned/finetune.yaml")
    labels: list[Label] | None = None  # None: every label column of train.csv; one label = a single-label run
    min_positives: int = Field(2, ge=1)  # per split (train, val); fewer -> label left out with a message
    pool: Literal["cls", "mean", "attentive"] = "mean"  # attentive = learned-query attention head
    attention_heads: int = Field(4, ge=1, le=64)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(8, ge=1)
    accum_steps: int = Field(1, ge=1)
    backbone_lr: float = Field(1e-4, ge=0, le=1.0)
    head_lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    freeze_backbone_epochs: int = Field(0, ge=0)  # first epochs train the head only
    class_weighted_loss: bool = True  # BCE pos_weight = negatives / positives in train, per label
    balanced_sampling: bool = False  # draw scans with weights that balance each label's classes
    grad_clip: float | None = Field(3.0, gt=0)
    flip_lr: bool = True
    jitter_hu: float = Field(5.0, ge=0, le=100)
    jitter_scale: float = Field(0.02, ge=0, le=0.5)
    eval_batch_size: int = Field(16, ge=1)
    bootstrap: int = Field(1000, ge=10)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    amp: Literal["auto", "bf16", "off"] = "auto"

    @field_validator("labels", mode="before")
    @classmethod
    def _one_label(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> FinetuneConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must divide batch_size={self.batch_size}")
        if self.batch_size // self.accum_steps < 2:
            raise ValueError("micro-batches need >= 2 scans (batch_size / accum_steps): BatchNorm in the head "
                             "and ResNet cannot normalise over one")
        return self


class TuneConfig(Section):
    """Optuna TPE over the fine-tuning learning rates and weight decay; trials start from the `finetune` section.

    Each trial fine-tunes for `epochs` epochs, reports mean val AUROC every epoch to a MedianPruner, and is an
    MLflow child run. `storage` None means `sqlite:///<project root>/optuna.db`; any RDB URL lets many
    processes share one study. The best values go to `best_params` (what finetune.tuned_params reads).
    """

    storage: str | None = None
    # None: "headct-finetune-<key>", the key hashing the search space, the finetune settings, the model's weights and
    # the split files, so a changed input (e.g. under `dvc repro`) starts a fresh study while workers on the same
    # inputs share one. A fixed name always means that study.
    study_name: str | None = None
    load_if_exists: bool = True
    n_trials: int = Field(10, ge=1)  # trials this process runs (several processes add up)
    epochs: int = Field(2, ge=1)  # per trial
    backbone_lr: tuple[float, float] = (1e-5, 1e-3)  # log-uniform range
    head_lr: tuple[float, float] = (1e-4, 1e-2)  # log-uniform range
    weight_decay: tuple[float, float] = (0.0, 0.1)  # uniform range
    seed: int | None = Field(0, ge=0)  # TPE sampler seed (None: random)
    n_startup_trials: int = Field(5, ge=0)  # TPE: random trials before modelling
    pruner_startup_trials: int = Field(2, ge=0)  # MedianPruner: trials finished before pruning starts
    pruner_warmup_epochs: int = Field(1, ge=0)  # MedianPruner: epochs of a trial before it may be pruned
    best_params: Path = Path("params/tuned/finetune.yaml")
    report_dir: Path = Path("reports/tune")

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
    """`headct predict STUDY`: one study through ingest QC and a fine-tuned classifier, to the terminal."""

    study: Path | None = None  # a DICOM folder or a NIfTI file (the positional argument)
    classifier_dir: Path = Path("models/classifier")
    keep: Literal["best", "all"] = "best"  # score the preferred series, or every series passing QC
    out: Path | None = None  # also write the result as JSON here (one-off ids only)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ReportConfig(Section):
    """The closing report: results table, radar of AUROC per label and model, few-shot curve, retrieval bars,
    calibration (Markdown + PNG + terminal). Optional inputs (None, or a file not written yet) are left out."""

    probe_metrics: Path = Path("reports/probe/metrics.json")
    probe_predictions: Path | None = Path("reports/probe/predictions.csv")
    pretrain_metrics: Path = Path("reports/pretrain/metrics.json")
    fewshot_metrics: Path | None = None
    retrieval_metrics: Path | None = None
    finetune_metrics: Path | None = None
    report_dir: Path = Path("reports/report")


class Params(Section):
    """The whole of params.yaml."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _coherent(self) -> Params:
        if self.pretrain.arch and any(s % self.pretrain.patch_size for s in self.ingest.preprocess.shape):
            raise ValueError(
                f"pretrain.patch_size={self.pretrain.patch_size} must divide every dimension of "
                f"ingest.preprocess.shape={list(self.ingest.preprocess.shape)}"
            )
        return self


# --------------------------------------------------------------------------------------------- resolution
_TUNED_DEFAULT = FinetuneConfig.model_fields["tuned_params"].default


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key, value and what is allowed."""


def find_project_root(start: Path | None = None) -> Path:
    """Nearest folder upward holding params.yaml or dvc.yaml, else the current folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() or (folder / "dvc.yaml").is_file():
            return folder
    return here


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: the key must name a section and a field, like pretrain.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` (without its last element), for did-you-mean hints."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            msg += f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: {msg}")
        else:
            lines.append(f"  {key} = {value!r}: {msg}")
    return "\n".join(lines)


def _tuned_params_file(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], root: Path) -> Path | None:
    """The existing tuned-parameters file finetune.tuned_params names (an override of it counts), else None."""
    section = tree.get("finetune")
    value: Any = section.get("tuned_params", _TUNED_DEFAULT) if isinstance(section, dict) else _TUNED_DEFAULT
    for item in overrides:
        parts, raw = _parse_override(item)
        if parts == ["finetune", "tuned_params"]:
            value = raw
    if value in (None, ""):
        return None
    path = resolve_path(root, Path(value))
    return path if path.is_file() else None


def read_tuned_params(path: Path) -> dict[str, Any]:
    """The `finetune:` mapping of a tuned-parameters file (written by `headct tune`)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML tuned-parameters file ({exc})") from None
    values = loaded.get("finetune") if isinstance(loaded, dict) else None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping under the key 'finetune'")
    return values


def load_params(
    params_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    root: Path | None = None,
) -> tuple[Params, Path]:
    """Resolve the configuration: defaults < params file < overrides. Returns (params, project root).

    The tuned-parameters file (finetune.tuned_params, when it exists) sits between the params file and the
    overrides: its `finetune:` values replace params.yaml's, and --set replaces both.
    Raises ConfigError (the CLI turns it into exit code 2) naming the offending key and value.
    """
    root = root or find_project_root()
    path = params_file or (root / "params.yaml")
    tree: dict[str, Any] = {}
    source = "built-in defaults"
    if params_file is not None and not params_file.is_file():
        raise ConfigError(f"params file not found: {params_file}")
    if path.is_file():
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    tuned = _tuned_params_file(tree, overrides, root)
    if tuned is not None:
        section = tree.setdefault("finetune", {})
        if isinstance(section, dict):
            section.update(read_tuned_params(tuned))
            source += f" + tuned {tuned}"
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(tree, parts, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return Params.model_validate(tree), root
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def resolve_path(root: Path, path: Path) -> Path:
    """Relative paths in params are relative to the project root, wherever the command runs from."""
    return path if path.is_absolute() else root / path


def dump_params(params: BaseModel) -> dict[str, Any]:
    """JSON-friendly dict of a config (for MLflow params, config.json and `headct config show`)."""
    return params.model_dump(mode="json")


class JobContext(BaseModel):
    """What every job gets beside its own section: the project root (relative paths in split files are
    relative to it) and the tracking settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    root: Path
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def with_absolute_paths(model: BaseModel, root: Path) -> BaseModel:
    """A copy of `model` whose relative Path fields (recursively) are made absolute under `root`."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            updates[name] = resolve_path(root, value)
        elif isinstance(value, BaseModel):
            updates[name] = with_absolute_paths(value, root)
    return model.model_copy(update=updates)
