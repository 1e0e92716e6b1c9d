"""Model directories: `config.json` (arch, preprocessing spec, windows, method, provenance) + `model.safetensors`
(encoder weights only; a masked-restoration (`mim`) directory also keeps `restoration_head.safetensors`, which the
residual read-out needs). The hand-over from pre-training to every evaluation.

Loading is strict: a missing, unexpected or mis-shaped weight is an error naming the keys, never a silent skip.
Before anything is built, config.json's architecture is checked against bounds and against the size of the weights
file (`check_arch`: an absurd width or depth in a corrupt or tampered config.json would otherwise allocate until
the machine runs out of memory); after loading, every floating-point tensor must be finite (a diverged run's NaN
weights would score every scan alike).
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
RESTORATION_HEAD = "restoration_head.safetensors"  # method mim only (headct/models/restoration.py)
REQUIRED = ("arch", "preprocess", "windows", "method", "provenance")
# Integer architecture values a config.json may hold, inclusive (ViT-g: width 1536, depth 40, 24 heads)
ARCH_BOUNDS = {"embed_dim": (1, 8192), "depth": (1, 256), "num_heads": (1, 256), "patch_size": (1, 128),
               "in_chans": (1, 64), "num_registers": (0, 256)}
MAX_GRID = 2048  # voxels along one axis of img_size
MAX_TOKENS = 2**21  # patches (img_size / patch_size, multiplied out): the positional table is tokens x width


def save_model_dir(path: Path, encoder: ViT3D, config: dict[str, Any],
                   extra: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write `path/model.safetensors` (and each `extra` module's weights under its file name) then
    `path/config.json`, each atomically; returns `path`.

    `config` needs preprocess, windows, method and provenance; `arch` is taken from the encoder (a
    different one given in `config` is an error, since the weights would not fit it).
    """
    missing = [k for k in REQUIRED if k != "arch" and k not in config]
    if missing:
        raise ValueError(f"model directory config lacks {missing}")
    if "arch" in config and config["arch"] != encoder.arch:
        raise ValueError(f"config arch {config['arch']} differs from the encoder's {encoder.arch}")
    path = Path(path)
    for name, module in (extra or {}).items():
        save_weights(module, path / name)
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


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_arch(arch: Any, config_file: Path, weights: Path | None = None) -> None:
    """Refuse, before anything is allocated, an architecture outside `ARCH_BOUNDS` / `MAX_GRID` / `MAX_TOKENS`, or
    one whose parameter count (estimated from width, depth, MLP ratio and patch size; ViT keys, absent ones at
    ViT-B's values) exceeds the bytes of `weights`: every stored parameter takes at least 2 bytes, so a config
    that claims more parameters than its weights file has bytes does not describe that file."""
    if not isinstance(arch, dict):
        raise InputError(f"{config_file}: arch must be a mapping, got {type(arch).__name__}")
    for key, (low, high) in ARCH_BOUNDS.items():
        if key in arch and not _int_in(arch[key], low, high):
            raise InputError(f"{config_file}: arch.{key} = {arch[key]!r} is not an integer in [{low}, {high}]")
    grid = arch.get("img_size", 96)
    grid = [grid] * 3 if isinstance(grid, int) and not isinstance(grid, bool) else grid
    if not isinstance(grid, list) or len(grid) != 3 or not all(_int_in(g, 1, MAX_GRID) for g in grid):
        raise InputError(f"{config_file}: arch.img_size = {arch.get('img_size')!r} is not 1 or 3 integers in "
                         f"[1, {MAX_GRID}]")
    ratio = arch.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 16:
        raise InputError(f"{config_file}: arch.mlp_ratio = {ratio!r} is not a number in (0, 16]")
    if str(arch.get("name", "")).startswith("resnet"):
        return  # a fixed ResNet: in_chans is its only setting
    if arch.get("name") == "cnn":  # the small CNN (headct.models.cnn): a few bounded stride-2 units
        channels = arch.get("channels", [])
        if not isinstance(channels, list) or not 1 <= len(channels) <= 8 or not all(_int_in(c, 1, 1024)
                                                                                     for c in channels):
            raise InputError(f"{config_file}: arch.channels = {channels!r} is not 1-8 integers in [1, 1024]")
        ratio = arch.get("mask_ratio")  # a classifier read out by the restoration residual records it
        if "mask_ratio" in arch and (isinstance(ratio, bool) or not isinstance(ratio, int | float)
                                     or not 0 < ratio < 1):
            raise InputError(f"{config_file}: arch.mask_ratio = {ratio!r} is not a number in (0, 1)")
        return
    width, depth, patch = arch.get("embed_dim", 768), arch.get("depth", 12), arch.get("patch_size", 16)
    tokens = (grid[0] // patch) * (grid[1] // patch) * (grid[2] // patch)
    if tokens > MAX_TOKENS:
        raise InputError(f"{config_file}: arch img_size {grid} at patch_size {patch} makes {tokens} patches, more "
                         f"than {MAX_TOKENS}")
    params = depth * (4 + 2 * ratio) * width**2 + patch**3 * arch.get("in_chans", 3) * width
    if weights is not None and weights.is_file() and params > weights.stat().st_size:
        raise InputError(f"{config_file}: arch describes about {params / 1e6:.1f} M parameters, but {weights} holds "
                         f"{weights.stat().st_size / 1e6:.1f} MB: this config.json does not describe these weights")


def check_finite(state: dict[str, torch.Tensor], weights: Path) -> None:
    """InputError naming `weights` and each floating-point tensor holding NaN or infinity."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(f"{weights}: NaN or infinite values in tensor(s) {shown}; these weights are broken (a "
                         "diverged run?) and would score every input alike")


def load_weights_strict(module: torch.nn.Module, weights: Path, described_by: Path) -> None:
    """Load `weights` (safetensors) into `module`: every key present, none extra, every shape equal, or an
    InputError naming the file and the keys (never a partial load)."""
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise InputError(f"{weights}: not found") from None
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{weights}: not a readable safetensors file ({exc})") from None
    check_finite(state, weights)
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
    check_arch(config["arch"], path / CONFIG, path / WEIGHTS)  # before anything is allocated
    try:
        encoder = build_model_encoder(config["arch"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path / CONFIG}: unusable arch ({exc})") from None
    load_weights_strict(encoder, path / WEIGHTS, path / CONFIG)
    return encoder.to(device).eval(), config


def build_model_encoder(arch: dict[str, Any]) -> Any:
    """The encoder a model directory's arch describes: a ViT3D, or the small CNN (`{"name": "cnn", ...}`, the
    masked-restoration encoder), at its random init."""
    if arch.get("name") == "cnn":
        from headct.models.resnet import build_backbone

        return build_backbone(arch)
    return build_encoder(arch)


def restoration_mask_ratio(path: Path, config: dict[str, Any]) -> float:
    """A mim directory's `mask_ratio` (it also sets the residual read-out's masks); InputError when absent or not
    in (0, 1), never a default standing in for it."""
    ratio = config.get("mask_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise InputError(f"{Path(path) / CONFIG}: mask_ratio = {ratio!r} is not a number in (0, 1); a masked-"
                         "restoration model directory records the share of cubes its pre-training hid")
    return float(ratio)


def load_restoration(path: Path, encoder: Any, config: dict[str, Any]) -> Any:
    """-> the `MaskedRestoration` of a mim model directory (its loaded `encoder` plus the strictly loaded head),
    in eval mode; InputError when the directory has no restoration head."""
    from headct.models.restoration import MaskedRestoration

    path = Path(path)
    if config.get("method") != "mim" or not (path / RESTORATION_HEAD).is_file():
        raise InputError(f"{path}: the residual read-out needs a masked-restoration (method mim) model directory "
                         f"with {RESTORATION_HEAD}; this one is method {config.get('method')!r}")
    model = MaskedRestoration(encoder, restoration_mask_ratio(path, config))
    load_weights_strict(model.head, path / RESTORATION_HEAD, path / CONFIG)
    return model.eval()
