"""Import an FM-HCT (HeadCT-Foundation, arXiv 2502.02779) encoder checkpoint into a headct model directory.

FM-HCT saves a MONAI-style ViT (``monai.networks.nets.ViT`` names) as a plain state dict (``model_weights.pth``)
or as a dict holding one under ``state_dict``; keys may carry the prefixes ``module.`` (DDP), ``backbone.``
(DINO wrapper) and ``_orig_mod.`` (torch.compile). Its layout (shared/REFERENCE.md, section 4): Conv3d patch
embedding (kernel = stride = patch), a learned (1, N, D) position table (no CLS row: the CLS token carries no
position), a CLS token, pre-norm blocks with LayerNorm eps 1e-5 and a fused qkv (no bias in FM-HCT), GELU MLP,
final LayerNorm eps 1e-6. ViT3D holds the same maths with ``pos_embed="learned"`` and ``block_norm_eps=1e-5``.

The conversion is strict: every tensor is mapped by name and shape-checked, the known-unused MONAI entries
(classification head, ``norm_cross_attn``, old ``cross_attn``) are dropped by name and counted, and anything else
is an error naming the keys. The file is read with ``torch.load(weights_only=True)`` plus an allow-list of harmless
types a training script leaves in a checkpoint (argparse.Namespace, numpy scalars); any other pickled object is
refused (a pickle can run code) naming the types found.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headct.config.base import DEFAULT_WINDOWS, PREPROCESS_MODES, PreprocessSpec
from headct.errors import InputError
from headct.io import file_sha256
from headct.models.model_dir import save_model_dir
from headct.models.vit import ViT3D, build_encoder

# FM-HCT's recipe in headct's terms (`headct ingest --preprocess fm-hct` makes a store with it): 96^3
# crop-to-head-then-stretch (aspect ratio not kept; per-axis spacing is in each volume's affine). Its 1 mm cubic
# pre-resampling and "> 0 HU" head box are approximated by one trilinear resampling from the source onto the head box
# (threshold localisation), see docs/datasets.md; the original recipe is kept in the provenance as text.
FMHCT_PREPROCESS = PreprocessSpec(**PREPROCESS_MODES["fm-hct"])
FMHCT_RECIPE = ("RAS; 1 mm isotropic (cubic); crop to the bounding box of voxels > 0 HU; resize the box to 96^3 "
                "(aspect ratio not kept); windows 40/80, 80/200, 600/2800 as channels in [0, 1]")
FMHCT_WINDOWS = [w.model_dump(mode="json") for w in DEFAULT_WINDOWS]  # brain 40/80, subdural 80/200, bone 600/2800
PREFIXES = ("module.", "backbone.", "_orig_mod.")
# Known-unused MONAI entries: the classification head (FM-HCT fine-tunes its own), the always-created
# norm_cross_attn, and the cross-attention blocks older MONAI versions created unconditionally.
UNUSED = re.compile(r"^(classification_head\.|blocks\.\d+\.(norm_cross_attn|cross_attn)\.)")
_REFUSED = {
    "patch_embedding.patch_embeddings.1.weight": "MONAI's 'perceptron' patch embedding (FM-HCT uses 'conv')",
    "blocks.0.attn.to_q.weight": "separate q/k/v projections (use_combined_linear=False; FM-HCT fuses qkv)",
}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.out_proj": "attn.proj",
          "mlp.linear1": "mlp.fc1", "mlp.linear2": "mlp.fc2"}
_TOP = {"cls_token": "cls_token", "patch_embedding.position_embeddings": "pos_embed",
        "patch_embedding.patch_embeddings.weight": "patch_embed.proj.weight",
        "patch_embedding.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
        "norm.bias": "norm.bias"}


def _safe_globals() -> list[Any]:
    """Types a real checkpoint may hold beside tensors, none of which runs code when unpickled."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [argparse.Namespace, scalar, np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64"))]


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The MONAI state dict in `path`, unwrapped (``state_dict``) and with the wrapper prefixes stripped.

    InputError naming the file when it is missing, not a torch checkpoint, holds a pickled object outside the
    allow-list, or has no state dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found")
    allowed = _safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.findall(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(exc))
        if not found:
            raise InputError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None
        try:  # every offending type, not only the first (zip format only; names, nothing is unpickled)
            names = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
            found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in names]
        except (ValueError, RuntimeError, OSError):
            pass
        raise InputError(f"{path}: refused: it holds pickled objects outside the allow-list ({', '.join(found)}); a "
                         "pickle can run code, so only tensors, containers, argparse.Namespace and numpy scalars "
                         "are loaded. Re-save the state dict alone (torch.save(model.state_dict(), ...))") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(obj).__name__}")
    other = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if other:
        raise InputError(f"{path}: entries that are not tensors {other[:8]}; expected a state dict (or a dict "
                         "holding one under 'state_dict')")
    state = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith(PREFIXES):
            name = name.removeprefix(next(p for p in PREFIXES if name.startswith(p)))
        if name in state:
            raise InputError(f"{path}: two entries become {name!r} once the prefixes {list(PREFIXES)} are stripped")
        state[name] = value
    return state


def infer_arch(state: dict[str, torch.Tensor], source: Path, num_heads: int = 12,
               img_size: int | None = None) -> dict[str, Any]:
    """ViT3D ``arch`` from the tensors' shapes. The head count is not in any shape: it is given (FM-HCT: 12).
    ``img_size`` (a cube edge in voxels) is inferred from a cubic position table when not given."""
    for key, why in _REFUSED.items():
        if key in state:
            raise InputError(f"{source}: {why} is not supported ({key})")
    for key in ("cls_token", "patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings"):
        if key not in state:
            raise InputError(f"{source}: no {key!r}; not an FM-HCT/MONAI ViT encoder with a CLS token "
                             f"(first keys: {sorted(state)[:6]})")
    weight, pos = state["patch_embedding.patch_embeddings.weight"], state["patch_embedding.position_embeddings"]
    if weight.dim() != 5 or len(set(weight.shape[2:])) != 1:
        raise InputError(f"{source}: patch embedding {list(weight.shape)} is not a cubic Conv3d kernel")
    dim, chans, patch = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise InputError(f"{source}: position table {list(pos.shape)} is not (1, N, {dim})")
    edge = round(pos.shape[1] ** (1 / 3)) if img_size is None else img_size // patch
    if img_size is not None and img_size % patch or edge**3 != pos.shape[1]:
        raise InputError(f"{source}: position table has {pos.shape[1]} rows, not a cube grid of patch {patch}"
                         + (f" for img_size {img_size}" if img_size is not None else "; give img_size"))
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise InputError(f"{source}: transformer blocks {blocks[:16]} are not numbered 0..depth-1")
    hidden = state.get("blocks.0.mlp.linear1.weight")
    if hidden is None:
        raise InputError(f"{source}: no 'blocks.0.mlp.linear1.weight'")
    if num_heads < 1 or dim % num_heads:
        raise InputError(f"{source}: width {dim} is not divisible by num_heads {num_heads}")
    return {"name": "base", "img_size": [edge * patch] * 3, "patch_size": patch, "in_chans": chans,
            "embed_dim": dim, "depth": len(blocks), "num_heads": num_heads,
            "mlp_ratio": int(hidden.shape[0]) / dim, "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "num_registers": 0, "pos_embed": "learned", "block_norm_eps": 1e-5}


def map_state(state: dict[str, torch.Tensor], encoder: ViT3D, source: Path) -> tuple[dict[str, torch.Tensor], int]:
    """MONAI names -> ViT3D names, every tensor shape-checked against `encoder`; -> (state, dropped count).

    Unknown keys, keys mapped twice, missing ViT3D keys and shape mismatches are one InputError naming them."""
    target = encoder.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, wrong, misfit, dropped = [], [], set(), 0
    for key, value in state.items():
        if UNUSED.match(key):
            dropped += 1
            continue
        name = _TOP.get(key)
        if name is None and (m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)) and m[2] in _BLOCK:
            name = f"blocks.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"
        if name is None or name not in target:
            unknown.append(key)
        elif value.shape != target[name].shape:
            wrong.append(f"{key} {list(value.shape)} -> {name} {list(target[name].shape)}")
            misfit.add(name)
        else:
            out[name] = value.detach().to(target[name].dtype)
    missing = sorted(set(target) - set(out) - misfit)
    if unknown or wrong or missing:
        raise InputError(f"{source}: does not map onto the FM-HCT layout: unmapped keys {sorted(unknown)[:12]}"
                         f"{' ...' if len(unknown) > 12 else ''}, wrong shapes {wrong[:12]}, missing "
                         f"{missing[:12]}")
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{source}: non-finite values (NaN/inf) in {bad[:12]}")
    return out, dropped


def import_fmhct(src: Path, dest: Path, num_heads: int = 12, img_size: int | None = None) -> dict[str, Any]:
    """Convert the FM-HCT checkpoint `src` into the model directory `dest` (weights + config.json recording
    FM-HCT's preprocessing and windows); returns a summary (arch, tensor and parameter counts, sha256s)."""
    src, dest = Path(src), Path(dest)
    if (dest / "config.json").exists() or (dest / "model.safetensors").exists():
        raise InputError(f"{dest}: already holds a model directory; choose a new destination")
    state = load_checkpoint(src)
    arch = infer_arch(state, src, num_heads, img_size)
    encoder = build_encoder(arch)
    mapped, dropped = map_state(state, encoder, src)
    encoder.load_state_dict(mapped, strict=True)
    params = sum(v.numel() for v in mapped.values())
    provenance = {"imported_from": "fm-hct", "source_recipe": FMHCT_RECIPE, "source_file": src.name, "source_sha256": file_sha256(src),
                  "tensors": len(mapped), "parameters": params, "dropped_unused_tensors": dropped,
                  "source_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})}
    preprocess = {**FMHCT_PREPROCESS.model_dump(mode="json"), "version": FMHCT_PREPROCESS.version}
    save_model_dir(dest, encoder, {"preprocess": preprocess, "windows": FMHCT_WINDOWS, "method": "fm-hct",
                                   "provenance": provenance})
    return {"model_dir": str(dest), "arch": encoder.arch, **provenance}
