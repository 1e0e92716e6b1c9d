"""The MLflow model registry side of fine-tuning: a pyfunc over a classifier directory, described by its gate.

The registered model version is an MLflow pyfunc whose artifact is the classifier directory (config.json +
model.safetensors), loaded strictly by `headct.models.classifier_dir`; the headct package travels with it (code_paths).
Input: canonical int16 HU volumes (B, X, Y, Z) on the classifier's grid; output: (B, L) float64 probabilities
(columns = config.json `labels`). Probabilities only: decisions belong to `FindingClassifier.decisions()`, which
applies the validation gate. The version's description is the gate's summary (`validation_gate.describe`: which
labels may decide, each label's val AUROC [95% CI]), so the registry never shows a classifier without what its
validation earned; its tag `validated_labels` lists them. No alias is moved.
Imported only by the fine-tuning job, after tracking has pointed MLflow at the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from headct.tracking import register_pyfunc


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """Canonical HU volumes -> (B, L) probabilities of the bundled classifier directory (the same
    `classifier_dir.predict_proba` as `headct.load_classifier(...).predict_proba`)."""

    def load_context(self, context: Any) -> None:
        from headct.models.classifier_dir import load_classifier

        self.network, _ = load_classifier(context.artifacts["classifier_dir"])

    # No type hints on predict: MLflow would try to derive a signature from them; it is given explicitly instead.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from headct.models.classifier_dir import predict_proba

        return predict_proba(self.network, np.asarray(model_input))


def register_classifier(
    classifier_dir: Path, name: str, grid: list[int], labels: list[str], description: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Log the classifier directory as a pyfunc in the active run and register a new version of `name` with
    `description` (the gate's summary) and `tags`. Returns {name, version}."""
    version = register_pyfunc("classifier_model", ClassifierPyfunc(), {"classifier_dir": str(classifier_dir)}, grid,
                              ("float64", len(labels)), name, tags, description)
    return {"name": name, "version": version}
