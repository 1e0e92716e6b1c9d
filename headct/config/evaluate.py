"""Sections of the evaluation stages: extract, probe, fewshot, retrieval, explain, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from headct.config.base import Label, Section


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
    # Use a model whose recorded preprocessing version is missing or differs from the split's store (a warning
    # instead of an error): an explicit choice, e.g. for imported weights made on an equivalent recipe.
    allow_preprocess_mismatch: bool = False


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
    # Use a model or external encoder whose recorded preprocessing version (config.json's, or `preprocess["version"]`
    # of the encoder) is missing or differs from the split's store: a warning instead of an error.
    allow_preprocess_mismatch: bool = False

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
