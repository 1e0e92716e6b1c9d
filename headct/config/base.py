"""What every section and job shares: the ``Section`` base, the label vocabulary, HU windows, the
preprocessing spec, the ``tracking`` section, ``JobContext`` and the path helpers.

Nothing here imports the other config modules, so a job that needs only these (and its own section's module)
depends on nothing else (see scripts/dvc_deps.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The canonical label vocabulary (DESIGN.md, "Labels"): CQ500's columns plus Tumor.
Label = Literal[
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH",
    "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
    "Fracture", "CalvarialFracture", "OtherFracture",
    "MassEffect", "MidlineShift", "Tumor",
]
LABELS: tuple[str, ...] = get_args(Label)  # the same names, in the same order, as a tuple


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


# Named recipes for `headct ingest --preprocess NAME`: settings of `ingest.preprocess`, so a store is made the way an
# imported encoder was trained. "fm-hct": FM-HCT's crop-to-the-head then anisotropic resize to 96^3 (its 1 mm
# isotropic pre-resampling is recorded as spacing_mm; the stretch fit samples the source directly onto the head box,
# so each volume's per-axis spacing is in its affine). headct.models.import_fmhct records the same spec.
PREPROCESS_MODES: dict[str, dict[str, Any]] = {
    "fm-hct": {"shape": (96, 96, 96), "spacing_mm": 1.0, "fit": "stretch", "head_localisation": "threshold"},
}


class TrackingConfig(Section):
    """MLflow boundary. ``uri`` None means ``sqlite:///<project root>/mlflow.db``; a server (``http://host:5000``,
    or a database URI such as ``postgresql://user@host/mlflow``) is checked before a job starts any work.
    ``offline``: log to ``offline_uri`` (None: ``sqlite:///<project root>/mlflow-offline.db``) instead, without
    contacting ``uri``; ``headct tracking sync`` uploads those runs later (headct/tracking_sync.py)."""

    uri: str | None = None
    experiment: str = "headct"
    system_metrics: bool = False
    offline: bool = False
    offline_uri: str | None = None


class JobContext(BaseModel):
    """What every job gets beside its own section: the project root (relative paths in split files are
    relative to it) and the tracking settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    root: Path
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def resolve_path(root: Path, path: Path) -> Path:
    """Relative paths in params are relative to the project root, wherever the command runs from."""
    return path if path.is_absolute() else root / path


def dump_params(params: BaseModel) -> dict[str, Any]:
    """JSON-friendly dict of a config (for MLflow params, config.json and `headct config show`)."""
    return params.model_dump(mode="json")


def with_absolute_paths(model: BaseModel, root: Path) -> BaseModel:
    """A copy of `model` whose relative Path fields (recursively) are made absolute under `root`."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            updates[name] = resolve_path(root, value)
        elif isinstance(value, dict) and any(isinstance(v, Path) for v in value.values()):  # e.g. name -> file
            updates[name] = {k: resolve_path(root, v) if isinstance(v, Path) else v for k, v in value.items()}
        elif isinstance(value, BaseModel):
            updates[name] = with_absolute_paths(value, root)
    return model.model_copy(update=updates)
