"""Sections of the evaluation stages: extract, probe, fewshot, retrieval, explain, compare, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator

from headct.config.base import Label, Section

# How a ViT's tokens become one vector per scan (headct/eval/features.py): the CLS token, the mean or the max of
# the patch tokens, or "meanmax" = mean and max concatenated (2 x D). GeM is left out on purpose: it needs
# non-negative activations (a CNN after ReLU), and LayerNorm-ed tokens are signed. "residual" (masked-restoration
# (mim) model directories only): 28 numbers summarising where the model could not restore the head from context
# (headct/models/restoration.py); for the small CNN "cls" is its global max, the other pools read its last map.
Pool = Literal["cls", "mean", "max", "meanmax", "residual"]


def _unique(values: tuple | list | None, what: str) -> tuple | list | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat a value, got {list(values)}")
    return values


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
    # Per-arm variant selection on val (needs `features`): the cache's variants (pool x block, see
    # `extract.pools`/`blocks`) are grouped by arm (pretrained, each random-init seed, hu_histogram, externals);
    # each arm keeps the variant with the highest mean val AUROC over these labels and is probed and scored on
    # test under the arm's name. None: no selection, every cached model is probed as it is.
    select_by: list[Label] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _selection_needs_cache(self) -> ProbeConfig:
        if self.select_by is not None and self.features is None:
            raise ValueError("probe.select_by chooses among cached variants: set probe.features (a feature cache)")
        return self


def _positive_shots(v: tuple[int, ...]) -> tuple[int, ...]:
    if any(k < 1 for k in v):
        raise ValueError(f"every K must be >= 1, got {list(v)}")
    return tuple(sorted(set(v)))


Shots = Annotated[tuple[int, ...], AfterValidator(_positive_shots)]  # few-shot K values: >= 1, sorted, unique
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ExtractConfig(Section):
    """Embed every scan of the split files once into a feature cache (`<out>/<model>.npz` + `.json`, index.json)
    that probe, few-shot and retrieval read. Arms: `pretrained` (model_dir), `random_init` (its seeded twin;
    `random_init.s<seed>` for the other `random_init_seeds`), `hu_histogram` (the non-learned baseline) and any
    external encoder (name -> "pkg.module:factory"); a ViT arm gives one cached model per (pool, block)."""

    splits: Path = Path("data/splits/synth")
    model_dir: Path | None = Path("models/mae")  # None: no ViT features (external encoders / histogram only)
    out: Path = Path("data/features/synth")
    random_init: bool = True
    hu_histogram: bool = True
    histogram_bins: int = Field(64, ge=4, le=1024)  # equal-width bins over [-100, 200) HU inside the head
    external: dict[ModelName, str] = Field(default_factory=dict)  # e.g. {"ctfm": "my_pkg.ctfm:make_encoder"}
    # ViT variants, all from one forward pass per volume and encoder: every (pool, block) pair of `pools` x
    # `blocks` becomes one cached model per ViT arm. The variant (pool=`pool`, last block) keeps the arm's plain
    # name (`pretrained`, `random_init`); the others are `<arm>.<pool>.b<block>` (e.g. `pretrained.max.b-2`).
    pool: Pool = "mean"
    pools: tuple[Pool, ...] | None = Field(None, min_length=1)  # None: (pool,)
    # Block indices (negative count from the end; -1 = the last) whose tokens, through the final LayerNorm,
    # are pooled (ViT3D.forward_intermediates(norm=True)).
    blocks: tuple[int, ...] = Field((-1,), min_length=1)
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)  # the random-init twin named `random_init`
    # Init seeds of the random-init twin, one arm each: `seed` is named `random_init`, any other s
    # `random_init.s<s>`. None: (seed,).
    random_init_seeds: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(None, min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Use a model or external encoder whose recorded preprocessing version (config.json's, or `preprocess["version"]`
    # of the encoder) is missing or differs from the split's store: a warning instead of an error.
    allow_preprocess_mismatch: bool = False

    @field_validator("external")
    @classmethod
    def _no_reserved_names(cls, v: dict[str, str]) -> dict[str, str]:
        # Built-in arms and their variants (`pretrained.max.b-2`), and the non-model keys of the metrics files.
        clash = sorted(n for n in v if n.split(".")[0] in {"pretrained", "random_init", "hu_histogram"}
                       or n in {"skipped", "selection", "diagnostic", "split"})
        if clash:
            raise ValueError(f"external encoder name(s) {clash} are reserved for the built-in models")
        return v

    @field_validator("pools", "blocks", "random_init_seeds")
    @classmethod
    def _no_repeats(cls, v: tuple | None, info: Any) -> tuple | None:
        return _unique(v, f"extract.{info.field_name}")


class FewshotConfig(Section):
    """K positives + K negatives per label (patient-level, without replacement) from train, several seeds,
    logistic regression on cached features (C and threshold chosen on val), scored on test."""

    features: Path = Path("data/features/synth")
    splits: Path = Path("data/splits/synth")
    report_dir: Path = Path("reports/fewshot")
    models: list[ModelName] | None = None  # None: every model in the cache
    labels: list[Label] | None = None  # None: every canonical label present in the split files
    shots: Shots = Field((1, 2, 4, 8, 16), min_length=1)  # K values
    seeds: int = Field(5, ge=1, le=1000)  # number of patient draws per K and label
    seed: int = Field(0, ge=0)  # the draws use seeds seed .. seed + seeds - 1 (each a different patient draw)
    c_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), min_length=1)  # chosen on val AUROC per fit
    min_positives: int = Field(2, ge=1)  # in val and test; fewer -> label skipped with a message
    # Per-arm variant selection on val, at each K on its own (as probe.select_by): per arm, the variant with the
    # highest val AUROC averaged over these labels and the seeds is kept and reported under the arm's name.
    select_by: list[Label] | None = Field(None, min_length=1)

    @property
    def draw_seeds(self) -> range:
        """The seeds of the patient draws, one per repetition."""
        return range(self.seed, self.seed + self.seeds)


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
    # cls / rollout: a ViT's attention; residual: a masked-restoration (mim) model's restoration residual; occlusion:
    # the classifier's probability under occluded cubes (any encoder). A method the encoder cannot give is skipped
    # with a note.
    methods: tuple[Literal["cls", "rollout", "occlusion", "residual"], ...] = ("cls", "rollout")
    slices: int = Field(6, ge=1, le=16)  # axial slices per row
    baseline_hu: float = Field(30.0, ge=-1024, le=3000)  # occlusion fill (brain parenchyma)
    report_dir: Path = Path("reports/explain")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CompareConfig(Section):
    """Does pre-training help? Paired comparisons on the probe's and few-shot's test predictions (one setting
    each: the probe, few-shot at each K of `shots`) for the primary label and the pre-declared `labels`:
    `model` vs the best random-init arm (non-overlapping 95% CIs), `model` vs `baseline` (paired bootstrap CI of
    the AUROC difference), and the gap closed towards a ceiling when one is given; per severity stratum when the
    store behind `splits` has a `meta.csv` with `stratum_column`. Method: headct/eval/compare.py."""

    probe_predictions: Path | None = Path("reports/probe/predictions.csv")
    fewshot_predictions: Path | None = Path("reports/fewshot/predictions.csv")
    splits: Path = Path("data/splits/synth")  # its split.json names the store whose meta.csv holds the strata
    report_dir: Path = Path("reports/compare")
    primary: Label = "ICH"
    labels: list[Label] = Field(default_factory=list)  # secondary labels, declared before any result is seen
    shots: Shots = Field((8, 16), min_length=1)  # few-shot K compared (a K not predicted is skipped)
    model: ModelName = "pretrained"
    # The random-init arms; None: every model named `random_init` or `random_init.s<seed>`. The best of them
    # (highest test AUROC, the conservative choice) is the one compared.
    random_init: list[ModelName] | None = Field(None, min_length=1)
    baseline: ModelName | None = "hu_histogram"
    # A ceiling (e.g. a supervised model trained with abundant labels): its predictions CSV (test rows; one
    # model, or name it in ceiling_model), or a metrics.json with a test AUROC per label ({"labels": {label:
    # {"auroc": x}}} as `headct finetune` writes, or {label: {"auroc": x}}). None: no gap closure.
    ceiling_predictions: Path | None = None
    ceiling_model: ModelName | None = None
    ceiling_metrics: Path | None = None
    # column of <store>/meta.csv (`headct synth`'s truth.csv carried by ingest: "stratum"); empty for negatives
    stratum_column: str = "stratum"
    stratum_labels: list[Label] = Field(default_factory=lambda: ["ICH"])  # labels whose positives are stratified
    # Fine-tuned arms: arm name -> its `headct finetune` predictions CSV (one model each; the arm name replaces
    # the file's model column, e.g. {pretrained: .../finetune-pretrained/predictions.csv, random_init: ...}).
    # Compared as the setting `finetune`: the arm named `model` against the best random-init arm; "at least as
    # good" when the paired CI's lower bound of the difference is >= -noninferiority_margin. Empty: no such setting.
    finetune_predictions: dict[ModelName, Path] = Field(default_factory=dict)
    noninferiority_margin: float = Field(0.02, ge=0.0, le=0.5)
    bootstrap: int = Field(1000, ge=10)  # patient (and seed) bootstrap resamples
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_ceiling(self) -> CompareConfig:
        if self.ceiling_predictions is not None and self.ceiling_metrics is not None:
            raise ValueError("set compare.ceiling_predictions or compare.ceiling_metrics, not both")
        if self.probe_predictions is None and self.fewshot_predictions is None:
            raise ValueError("compare needs probe_predictions or fewshot_predictions")
        return self


class ReportConfig(Section):
    """The closing report: results table, radar of AUROC per label and model, few-shot curve, retrieval bars,
    calibration (Markdown + PNG + terminal). Optional inputs (None, or a file not written yet) are left out."""

    probe_metrics: Path = Path("reports/probe/metrics.json")
    probe_predictions: Path | None = Path("reports/probe/predictions.csv")
    # None: the encoder was not pre-trained here (e.g. imported with `headct import-weights`): no pretext-loss line
    pretrain_metrics: Path | None = Path("reports/pretrain/metrics.json")
    fewshot_metrics: Path | None = None
    retrieval_metrics: Path | None = None
    finetune_metrics: Path | None = None
    compare_metrics: Path | None = None  # `headct compare`: the "Does pre-training help?" table
    report_dir: Path = Path("reports/report")
