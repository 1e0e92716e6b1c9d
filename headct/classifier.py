"""The public inference surface of a fine-tuned classifier: `headct.load_classifier(dir)` -> `FindingClassifier`.

A `FindingClassifier` is the network plus what it was trained with (preprocessing, HU windows, per-label thresholds
chosen on val) and what validation measured (config.json `performance`). `predict_proba()` gives every label's
probability; `decisions()` applies the thresholds only to labels the validation gate
(`headct.eval.validation_gate`) calls validated, and refuses the others unless the caller passes
`allow_unvalidated=True`: a threshold chosen where the val AUROC was at chance decides nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headct.errors import InputError
from headct.eval.validation_gate import GateRule, UnvalidatedLabelError, Verdict, judge
from headct.models.heads import Classifier


@dataclass
class FindingClassifier:
    """A fine-tuned classifier in eval mode on `device`, with its config and the gate's verdict per label."""

    network: Classifier
    config: dict[str, Any]
    rule: GateRule
    verdicts: dict[str, Verdict]
    device: torch.device

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {label: float(self.config["thresholds"][label]) for label in self.labels}

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.config["preprocess"])

    @property
    def validated_labels(self) -> list[str]:
        return [label for label in self.labels if self.verdicts[label].validated]

    def predict_proba(self, volumes: np.ndarray | torch.Tensor | str | Path) -> np.ndarray:
        """Canonical HU volume(s) (X, Y, Z) or (B, X, Y, Z), or a DICOM folder / NIfTI file (ingested with this
        classifier's preprocessing, like `headct predict`) -> (B, L) float64 probabilities, columns = `labels`."""
        from headct.models.classifier_dir import predict_proba

        if isinstance(volumes, str | Path):
            from headct.study import load_study

            volumes = np.stack(load_study(volumes, self.preprocess).volumes)
        return predict_proba(self.network, volumes)

    def decisions(
        self, probabilities: np.ndarray, labels: Sequence[str] | None = None, allow_unvalidated: bool = False
    ) -> dict[str, np.ndarray]:
        """(B, L) probabilities from `predict_proba` -> label -> (B,) bool (probability >= the val threshold).

        labels: which labels to decide (default: all). A label that is not validated raises
        `UnvalidatedLabelError` naming it and its val AUROC, unless `allow_unvalidated=True` (the caller then owns
        a decision validation did not earn); pass `labels=clf.validated_labels` to decide only those.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim == 1:
            probabilities = probabilities[None]
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.labels):
            raise InputError(f"expected (B, {len(self.labels)}) probabilities (columns {self.labels}), "
                             f"got shape {list(probabilities.shape)}")
        wanted = self.labels if labels is None else list(labels)
        unknown = [label for label in wanted if label not in self.labels]
        if unknown:
            raise InputError(f"unknown label(s) {unknown}; this classifier has {self.labels}")
        refused = [self.verdicts[label] for label in wanted if not self.verdicts[label].validated]
        if refused and not allow_unvalidated:
            raise UnvalidatedLabelError(
                f"no decision for unvalidated label(s) ({self.rule.text()}): "
                + "; ".join(f"{v.label}: {v.status()}, {v.reason}" for v in refused)
                + f". Decide only validated ones (labels={self.validated_labels}) or pass allow_unvalidated=True.")
        thresholds = self.thresholds
        return {label: probabilities[:, self.labels.index(label)] >= thresholds[label] for label in wanted}


def load_classifier(
    classifier_dir: str | Path, device: str | torch.device = "cpu", min_auroc_low: float | None = None,
    min_val_positives: int | None = None,
) -> FindingClassifier:
    """Read a classifier directory (strictly) -> `FindingClassifier`; the gate's settings default to
    `headct predict`'s (validation_gate.DEFAULT_MIN_AUROC_LOW / DEFAULT_MIN_VAL_POSITIVES)."""
    from headct.models.classifier_dir import CONFIG
    from headct.models.classifier_dir import load_classifier as load_network

    rule = GateRule(**{k: v for k, v in (("min_auroc_low", min_auroc_low), ("min_val_positives", min_val_positives))
                       if v is not None})
    network, config = load_network(Path(classifier_dir), device)
    verdicts = judge(config, rule, str(Path(classifier_dir) / CONFIG))
    return FindingClassifier(network, config, rule, verdicts, torch.device(device))
