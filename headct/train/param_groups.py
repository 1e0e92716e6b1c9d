"""AdamW parameter groups: no weight decay on biases, norms and token/position tables; layer-wise
learning-rate decay over a ViT3D's blocks (BEiT, Bao et al. 2022; MAE fine-tuning); a learning-rate multiplier
for head modules.

How a schedule applies the groups: every group carries ``lr_scale``, and at each step

    group["lr"] = base_lr(step) * group["lr_scale"]

(``set_lrs`` does exactly that). ``name`` ("backbone.blocks.3/decay", "head/no_decay", ...) is for logging and
``part`` ("head" or "body") lets a caller treat the head apart (e.g. freeze the body for the first epochs).

The no-decay rule is the one ``headct.train.engine.adamw`` applies in pre-training (1-D parameters and the
names a model lists in ``no_weight_decay()``), extended so that a ViT3D nested anywhere is covered even when
the wrapping model does not list its tables: pre-training's weights are untouched by this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from headct.models.vit import ViT3D

_EMBED = ("patch_embed.", "cls_token", "register_tokens", "pos_embed")  # layer 0 of layer-wise decay
_TABLE_LEAVES = ("cls_token", "register_tokens", "mask_token", "pos_embed")  # token/position tables: no decay


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the multi-dimensional parameters kept out of weight decay:
    what ``model.no_weight_decay()`` lists, plus the token and position tables of every ViT3D inside it.
    (1-D parameters, i.e. biases and norm weights, are never decayed whatever this returns.)"""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for prefix, module in model.named_modules():
        if isinstance(module, ViT3D):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def _encoders(model: nn.Module) -> list[tuple[str, ViT3D]]:
    """(name prefix with a trailing dot, encoder) of every ViT3D in ``model``, deepest first."""
    found = [(f"{p}." if p else "", m) for p, m in model.named_modules() if isinstance(m, ViT3D)]
    return sorted(found, key=lambda pm: -len(pm[0]))


def _layer(rel: str, depth: int) -> tuple[int, str]:
    """(layer id, group stem) of a parameter named ``rel`` inside a ViT3D: 0 = embeddings, i + 1 = block i,
    depth + 1 = the final norm (and anything else at the top of the encoder)."""
    if rel.startswith("blocks."):
        i = int(rel.split(".")[1])
        return i + 1, f"blocks.{i}"
    if rel.startswith(_EMBED):
        return 0, "embed"
    return depth + 1, "norm"


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    head_modules: Sequence[str] = ("head",),
    head_lr_mult: float = 1.0,
    base_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW``. Frozen parameters (``requires_grad=False``) are left out, as
    in ``engine.adamw``: build the groups before freezing anything that is unfrozen later.

    Args:
        model: any module; layer-wise decay needs a ViT3D inside it (e.g. ``Classifier.backbone``).
        weight_decay: decay of the weight matrices; biases, norms, position tables and the CLS/register/mask
            tokens get 0 (``no_weight_decay_names``).
        layer_decay: None = one learning rate for the whole body. A float d in (0, 1]: block i of a depth-L
            encoder gets ``lr_scale = d ** (L - i)``, its embeddings (patch embedding, CLS, registers)
            ``d ** (L + 1)`` and its final norm 1, so the first blocks move least.
        head_modules: names of the head submodules (dotted paths in ``named_modules``).
        head_lr_mult: ``lr_scale`` of every parameter in ``head_modules`` (e.g. head_lr / backbone_lr).
        base_lr: if given, each group also gets ``lr = base_lr * lr_scale`` (so the scales hold without a
            schedule); a schedule must re-apply them each step (``set_lrs``).
    Returns:
        groups with keys params, weight_decay, decay (True for the decayed group: what a weight-decay schedule
        drives), lr_scale, name ("<layer>/decay" or "<layer>/no_decay"), part ("head" or "body"); layers in the order of ``named_parameters``, the decayed group of each first.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if head_lr_mult <= 0:
        raise ValueError(f"head_lr_mult must be > 0, got {head_lr_mult}")
    modules = dict(model.named_modules())
    missing = [h for h in head_modules if h not in modules]
    if missing and head_lr_mult != 1.0:  # the multiplier would silently apply to nothing
        top = sorted(n for n in modules if n and "." not in n)
        raise ValueError(f"head modules {missing} are not in {type(model).__name__} "
                         f"(its top-level modules: {top})")
    encoders = _encoders(model)
    if layer_decay is not None and not encoders:
        raise ValueError(f"layer_decay needs a ViT3D encoder inside {type(model).__name__}; found none "
                         "(use layer_decay=None for other backbones)")
    skip = no_weight_decay_names(model)
    heads = tuple(h for h in head_modules if h in modules)
    groups: dict[str, dict[str, Any]] = {}
    stems: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_head = next((h for h in heads if name == h or name.startswith(f"{h}.")), None)
        stem, scale = "body", 1.0
        if in_head is not None:
            stem, scale = in_head, head_lr_mult
        elif layer_decay is not None:
            for prefix, enc in encoders:
                if name.startswith(prefix):
                    depth = len(enc.blocks)
                    layer, sub = _layer(name[len(prefix):], depth)
                    stem, scale = prefix + sub, layer_decay ** (depth + 1 - layer)
                    break
        decay = param.ndim > 1 and name not in skip and name.rsplit(".", 1)[-1] not in _TABLE_LEAVES
        key = f"{stem}/{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "decay": decay,
                           "lr_scale": scale, "name": key, "part": "head" if in_head is not None else "body"}
            if base_lr is not None:
                groups[key]["lr"] = base_lr * scale
        groups[key]["params"].append(param)
        stems.setdefault(stem, len(stems))
    # Layers in order of appearance, the decayed group of each first: without layer decay or head modules this
    # is exactly engine.adamw's [decay, no_decay], so an optimizer state saved by one loads into the other.
    def order(group: dict[str, Any]) -> tuple[int, bool]:
        stem, kind = group["name"].rsplit("/", 1)
        return stems[stem], kind == "no_decay"

    return sorted(groups.values(), key=order)


def set_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the schedule's ``lr`` (the base learning rate at this step) to every group, times its ``lr_scale``
    (1 for groups made without ``param_groups``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
