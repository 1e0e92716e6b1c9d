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

import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from headct.tracking import PACKAGE, pyfunc_requirements

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
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int16), (-1, *grid))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
    )
    with warnings.catch_warnings():
        # No input example on purpose: it would run the encoder on a full volume at log time (slow for ViT-B)
        # and store it; the signature above is explicit.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            name="encoder", python_model=EncoderPyfunc(), artifacts={"model_dir": str(model_dir)},
            code_paths=[str(PACKAGE)], pip_requirements=pyfunc_requirements(), signature=signature,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": version, "champion": promote}
