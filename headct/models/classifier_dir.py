"""Classifier directories: what `headct finetune` hands to `headct predict`.

Layout: ``model.safetensors`` (backbone + head weights, keys ``backbone.*`` and ``head.*``) and ``config.json``
(labels, per-label thresholds chosen on val, HU windows, preprocessing spec, backbone arch, pool, head type,
``weights_sha256`` of the weights file, provenance). Loading is strict: a missing, unexpected or mis-shaped key,
or weights whose SHA-256 differs from the config's, is an `InputError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headct.errors import InputError
from headct.io import file_sha256, write_json
from headct.models.heads import Classifier
from headct.models.model_dir import check_arch, load_weights_strict, read_config, save_weights
from headct.models.resnet import build_backbone

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
REQUIRED = ("labels", "thresholds", "windows", "preprocess", "arch", "pool", "head", "weights_sha256")


def save_classifier(path: Path, classifier: Classifier, config: dict[str, Any]) -> Path:
    """Write weights then config.json (each atomically) into `path`; returns `path`.

    `config` needs labels, thresholds (label -> probability), windows and preprocess; arch, pool, head and
    the weights' SHA-256 are taken from the classifier and the written file.
    """
    missing = [k for k in ("labels", "thresholds", "windows", "preprocess") if k not in config]
    if missing:
        raise ValueError(f"classifier config lacks {missing}")
    path = Path(path)
    sha = save_weights(classifier, path / WEIGHTS)
    write_json(path / CONFIG, {
        **config, "arch": dict(classifier.backbone.arch), "pool": classifier.pool, "head": classifier.head_type,
        "n_outputs": len(config["labels"]), "weights_sha256": sha,
    })
    return path


def read_classifier_config(path: Path) -> dict[str, Any]:
    """The config.json of a classifier directory, with its required keys checked."""
    return read_config(path, REQUIRED, "a classifier directory (from `headct finetune`)")


def load_classifier(path: Path | str, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """-> (classifier in eval mode with ``labels`` and ``windows`` set, config). Strict, see the module doc."""
    path = Path(path)
    config = read_classifier_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: not found")
    if file_sha256(weights) != config["weights_sha256"]:
        raise InputError(f"{weights}: SHA-256 differs from {path / CONFIG} (weights changed after saving)")
    check_arch(config["arch"], path / CONFIG, weights)  # before anything is allocated
    try:
        backbone = build_backbone(config["arch"])
        classifier = Classifier(backbone, config["pool"], len(config["labels"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{path / CONFIG}: unusable arch/pool ({exc})") from None
    if classifier.head_type != config["head"]:
        raise InputError(f"{path / CONFIG}: head {config['head']!r} does not fit pool {config['pool']!r}")
    load_weights_strict(classifier, weights, path / CONFIG)
    classifier.labels = list(config["labels"])
    classifier.windows = list(config["windows"])
    return classifier.to(device).eval(), config


def predict_proba(
    classifier: Classifier, hu_volumes: torch.Tensor | np.ndarray, windows: Sequence[Any] | None = None
) -> np.ndarray:
    """(B, X, Y, Z) or (X, Y, Z) canonical HU volumes -> (B, L) float64 probabilities, one column per label
    (order: ``classifier.labels``). Windows default to the classifier's own (from its config.json)."""
    from headct.data.windows import hu_to_windows

    hu = torch.as_tensor(np.asarray(hu_volumes) if not isinstance(hu_volumes, torch.Tensor) else hu_volumes)
    if hu.dim() == 3:
        hu = hu[None]
    device = next(classifier.parameters()).device
    classifier.eval()
    with torch.inference_mode():
        x = hu_to_windows(hu.to(device), windows if windows is not None else classifier.windows or None)
        return torch.sigmoid(classifier(x).float()).double().cpu().numpy()
