"""Pydantic models for every ``params.yaml`` section, and the loader that resolves them.

Precedence, lowest first: code defaults < params.yaml < tuned-parameters file (fine-tuning only, later)
< ``--set section.key=value``. Every model forbids unknown keys, so a typo is an error that names the key
before any work starts. This module imports only pydantic/yaml so ``headct --help`` stays instant.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    # Fraction of studies carrying each finding; the demo set is enriched so every label can be evaluated.
    prevalence: dict[str, float] = Field(
        default_factory=lambda: {
            "IPH": 0.2, "IVH": 0.2, "SDH": 0.2, "EDH": 0.2, "SAH": 0.2,
            "ChronicBleed": 0.2, "CalvarialFracture": 0.2, "OtherFracture": 0.2, "Tumor": 0.2,
        }
    )
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


class PretrainConfig(Section):
    """Self-supervised pre-training (MAE first; DINO in a later issue)."""

    splits: Path = Path("data/splits/synth")
    model_dir: Path = Path("models/mae")
    # Resume state lives outside DVC outputs (DVC deletes outputs before re-running a stage).
    checkpoint_dir: Path = Path("checkpoints/pretrain")
    report_dir: Path = Path("reports/pretrain")
    method: Literal["mae"] = "mae"
    arch: Literal["tiny", "small", "base"] = "tiny"
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


class ReportConfig(Section):
    """The closing results table (Markdown + terminal)."""

    probe_metrics: Path = Path("reports/probe/metrics.json")
    pretrain_metrics: Path = Path("reports/pretrain/metrics.json")
    report_dir: Path = Path("reports/report")


class Params(Section):
    """The whole of params.yaml."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
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


def load_params(
    params_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    root: Path | None = None,
) -> tuple[Params, Path]:
    """Resolve the configuration: defaults < params file < overrides. Returns (params, project root).

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
