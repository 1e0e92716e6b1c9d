"""The MLflow model registry side of pre-training: a pyfunc that wraps a model directory, and the `champion` alias.

The registered model is an MLflow pyfunc whose artifact is the model directory itself (config.json +
model.safetensors) and whose loader is `headct.load_encoder`; the headct package travels with it (code_paths), so
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(volumes)` works in any environment with torch,
safetensors and numpy. Input: canonical int16 HU volumes (B, X, Y, Z) on the model's grid; output: (B, D) float32
embeddings (mean of the patch tokens).

Promotion rule: a version becomes `champion` when its run finished (a diverged run raises before it gets here),
its held-out loss at the end is below the one at the start and (DINO) it has not collapsed; the pre-training job
decides and passes `promote`. Newer qualifying runs take the alias over.
Fine-tuned classifiers are registered by `headct.classifier_registry` (its own module, so neither stage's code
deps include the other's model code). Imported only by the pre-training job, after tracking has pointed MLflow at
the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from headct.tracking import register_pyfunc

CHAMPION = "champion"


class EncoderPyfunc(mlflow.pyfunc.PythonModel):
    """Canonical HU volumes -> embeddings, through `headct.load_encoder` on the bundled model directory."""

    def load_context(self, context: Any) -> None:
        from headct.encoder import load_encoder

        self.encoder = load_encoder(context.artifacts["model_dir"])

    # No type hints on predict: MLflow would try to derive a signature from them; it is given explicitly instead.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return self.encoder.embed(np.asarray(model_input))


def register_encoder(
    model_dir: Path, name: str, grid: list[int], embed_dim: int, promote: bool, tags: dict[str, str],
    description: str | None = None,
) -> dict[str, Any]:
    """Log the model directory as a pyfunc in the active run, register a new version of `name` (with
    `description`: the model card's text, headct/model_card.py), and move the `champion` alias to it when
    `promote`. Returns {name, version, champion}."""
    version = register_pyfunc("encoder", EncoderPyfunc(), {"model_dir": str(model_dir)}, grid,
                              ("float32", embed_dim), name, tags, description)
    if promote:
        mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": version, "champion": promote}
