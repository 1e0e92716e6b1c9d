"""Sections of the data stages: ``synth``, ``ingest`` (with its QC rules) and ``split``."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from headct.config.base import LABELS, PreprocessSpec, Section


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
    # The canonical grid (shape x spacing, 192 mm by default) is centred on the head's bounding box; a longer head
    # loses the excess. More than this many mm cut along any axis -> `head_cropped` (None: record, never reject).
    # The cropped extent per axis is in the manifest (crop_x_mm, crop_y_mm, crop_z_mm). Measured at 192 mm, all
    # along y (face to occiput): the real adult head CT of the tests 28.1 mm; the synthetic demo up to 36.6 mm
    # (60 patients at the demo's resolution; 34.8 mm over 400 at the quick profile's), so 50 mm passes normal
    # heads and stops a box that is not a head (a head holder or body part fused to it, a whole-body scan).
    max_crop_mm: float | None = Field(50.0, ge=0.0)

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
    # Labels (headct/data/label_sources): `cq500` a reads.csv (majority of R1-R3), `rsna2019` the RSNA 2019
    # stage_2_train.csv (per slice; a series is 1 if any slice is), `table` a CSV with a key column and canonical
    # label columns, or `none` (pre-training only data). Another source is added with label_sources.register.
    labels: Path | None = Path("data/raw/synth/reads.csv")
    labels_format: str = "cq500"
    # `table` only: what its key column holds, and that column's name (None: the column named like labels_key)
    labels_key: Literal["patient", "study", "series", "path"] = "patient"
    labels_key_column: str | None = None
    # Patient key: DICOM PatientID, or the CQ500-layout folder name (`CQ500CT0 CQ500CT0/...` <-> `CQ500-CT-0`).
    patient_key: Literal["dicom", "cq500_folder"] = "cq500_folder"
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    # The pseudonym key comes from HEADCT_PSEUDONYM_KEY or HEADCT_PSEUDONYM_KEY_FILE, never from here. The public
    # demo key is used only for data `headct synth` wrote, recognised from its files (headct/data/identity.py).
    # `demo_key` is refused (any value), so an old params file that opted real data into the demo key stops.
    demo_key: None = Field(None, exclude=True)
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
    # A store holds one preprocessing recipe and one SRC (headct/data/guards.py): a run with another recipe or
    # SRC is refused unless `rebuild: true`, which converts every series again and replaces the store's volumes.
    rebuild: bool = False
    export_nifti: bool = False  # also write DEST/nifti/<scan_id>.nii.gz (the canonical volume with its affine)
    # The job exits non-zero (after writing the store and reports) when more than this fraction of the series
    # found were rejected as broken (headct.data.guards.BROKEN: unreadable, invalid header, missing pixel data
    # ...; series set aside by a QC rule or by selection do not count), or when no series was accepted.
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    contact_sheet_volumes: int = Field(8, ge=0, le=64)  # volumes shown in <report_dir>/contact_sheet.png
    report_dir: Path = Path("reports/ingest")

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError(f"workers must be 1-256 or 'auto', got {v}")
        return v

    @field_validator("demo_key", mode="before")
    @classmethod
    def _demo_key_removed(cls, v: object) -> None:
        raise ValueError("removed (issue 12): the public demo key is used only for data `headct synth` wrote, "
                         "recognised from its files, with no setting; real data needs HEADCT_PSEUDONYM_KEY or "
                         "HEADCT_PSEUDONYM_KEY_FILE. Delete this line from the params file")

    @field_validator("labels_format")
    @classmethod
    def _label_source_name(cls, v: str) -> str:
        # Which names exist is the registry's to say (headct/data/label_sources; a user may register one), so
        # the name is checked there, when ingest starts and before any work; here only its form.
        if not v.isidentifier():
            raise ValueError(f"labels_format must be a label source's name (e.g. none, cq500, rsna2019, table), "
                             f"got {v!r}")
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
    # Patients in val and test as absolute numbers instead of `fractions` (train gets the rest), e.g.
    # {val: 100, test: 200}: a benchmark keeps its evaluation sets the same size whatever the store's size.
    counts: dict[Literal["val", "test"], int] | None = None
    # Train patients that keep their labels, drawn seeded and label-stratified from train; every other train
    # patient goes to `pool.csv`, the unlabelled pre-training pool (pretrain.pool). None: all of train is
    # labelled and no pool.csv is written (the split is then byte-identical to one made without this setting).
    labelled_train: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    report_dir: Path = Path("reports/split")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must be positive and sum to 1, got {list(v)}")
        return v

    @field_validator("counts")
    @classmethod
    def _both_counts(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and (set(v) != {"val", "test"} or any(n < 1 for n in v.values())):
            raise ValueError(f"counts needs val and test, each >= 1 patient (e.g. {{val: 100, test: 200}}), got {v}")
        return v

    @model_validator(mode="after")
    def _fractions_or_counts(self) -> SplitConfig:
        if self.counts is not None and "fractions" in self.model_fields_set:
            raise ValueError("set either fractions or counts, not both (with counts, train gets the rest)")
        return self
