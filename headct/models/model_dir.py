"""Model directories: `config.json` (arch, preprocessing spec, windows, method, provenance) + `model.safetensors`
(encoder weights only). The hand-over from pre-training to every evaluation.

Loading is strict: a missing, unexpected or mis-shaped weight is an error naming the keys, never a silent skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from headct.errors import InputError
from headct.io import atomic_path, file_sha256, write_json
from headct.models.vit import ViT3D, build_encoder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
REQUIRED = ("arch", "preprocess", "windows", "method", "provenance")


def save_model_dir(path: Path, encoder: ViT3D, config: dict[str, Any]) -> Path:
    """Write `path/model.safetensors` then `path/config.json`, each atomically; returns `path`.

    `config` needs preprocess, windows, method and provenance; `arch` is taken from the encoder (a
    different one given in `config` is an error, since the weights would not fit it).
    """
    missing = [k for k in REQUIRED if k != "arch" and k not in config]
    if missing:
        raise ValueError(f"model directory config lacks {missing}")
    if "arch" in config and config["arch"] != encoder.arch:
        raise ValueError(f"config arch {config['arch']} differs from the encoder's {encoder.arch}")
    path = Path(path)
    save_weights(encoder, path / WEIGHTS)
    write_json(path / CONFIG, {**config, "arch": encoder.arch})
    return path


def save_weights(module: torch.nn.Module, weights: Path) -> str:
    """Write `module`'s state (CPU, contiguous) as safetensors, atomically; returns the file's SHA-256."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        return file_sha256(tmp)


def read_config(path: Path, required: tuple[str, ...] = REQUIRED, what: str = "a model directory") -> dict[str, Any]:
    """The config.json of a model (or classifier) directory with its `required` keys checked; InputError naming
    the file and the problem."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"{file}: not found; is {path} {what}?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: not readable JSON ({exc})") from None
    missing = [k for k in required if k not in config]
    if missing:
        raise InputError(f"{file}: missing keys {missing}")
    return config


def load_weights_strict(module: torch.nn.Module, weights: Path, described_by: Path) -> None:
    """Load `weights` (safetensors) into `module`: every key present, none extra, every shape equal, or an
    InputError naming the file and the keys (never a partial load)."""
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise InputError(f"{weights}: not found") from None
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{weights}: not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong:
        raise InputError(f"{weights} does not fit {described_by}: missing keys {missing}, unexpected keys "
                         f"{unexpected}, wrong shapes {wrong}")
    module.load_state_dict(state, strict=True)


def load_model_dir(path: Path, device: str | torch.device = "cpu") -> tuple[ViT3D, dict[str, Any]]:
    """-> (encoder in eval mode, config). Strict: missing/unexpected/mis-shaped weights raise InputError."""
    path = Path(path)
    config = read_config(path)
    try:
        encoder = build_encoder(config["arch"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path / CONFIG}: unusable arch ({exc})") from None
    load_weights_strict(encoder, path / WEIGHTS, path / CONFIG)
    return encoder.to(device).eval(), config
