"""The public inference surface of a pre-trained encoder: `headct.load_encoder(model_dir)` -> `Encoder`.

An `Encoder` is the network plus what it was trained with: the store's preprocessing spec (grid, spacing,
orientation) and the HU windows that make its input channels. `embed()` takes canonical int16 HU volumes
(the store's `.npy` files, one (X, Y, Z) array or a (B, X, Y, Z) batch), or a DICOM folder / NIfTI file that it
ingests with the model's preprocessing, and applies the windows itself, so a caller never re-implements the
input pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from headct.errors import InputError
from headct.models.vit import ViT3D


@dataclass
class Encoder:
    """A frozen encoder with its preprocessing. `model` is in eval mode on `device`."""

    model: ViT3D
    preprocess: dict[str, Any]
    windows: list[dict[str, Any]]
    method: str
    device: torch.device

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.preprocess["shape"])

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @torch.inference_mode()
    def embed(
        self, volumes: np.ndarray | torch.Tensor | str | Path, pool: Literal["mean", "cls"] = "mean",
        batch_size: int = 8,
    ) -> np.ndarray:
        """Canonical HU volume(s) (X, Y, Z) or (B, X, Y, Z), int16 or float HU -> (B, D) float32 embeddings.
        A path (a DICOM folder or a NIfTI file) is ingested first with this model's preprocessing, through the
        same code as `headct ingest` (`headct.study.load_study`); B is then the number of series kept (one).

        pool: mean of the patch tokens (default, as the probes use) or the CLS token.
        """
        from headct.data.windows import hu_to_windows

        if isinstance(volumes, str | Path):
            from headct.study import load_study

            volumes = np.stack(load_study(volumes, self.preprocess).volumes)
        hu = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes)
        if hu.dim() == 3:
            hu = hu[None]
        if hu.dim() != 4 or tuple(hu.shape[1:]) != self.grid:
            raise InputError(
                f"expected canonical volumes of shape {list(self.grid)} (or a batch of them), got {list(hu.shape)}; "
                "ingest the study with this model's preprocess spec first"
            )
        out = [
            self.model.forward_pooled(hu_to_windows(chunk.to(self.device), self.windows), pool).float().cpu()
            for chunk in hu.split(batch_size)
        ]
        return torch.cat(out).numpy()


def load_encoder(model_dir: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Read a model directory (strictly: every weight must match) -> `Encoder` on `device`, in eval mode."""
    from headct.models.model_dir import load_model_dir

    model, config = load_model_dir(Path(model_dir), device)
    return Encoder(model, dict(config["preprocess"]), list(config["windows"]), str(config["method"]),
                   torch.device(device))
