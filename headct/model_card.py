"""Model cards: one dict of facts -> the `README.md` of a model directory and the description of its registered
model version, so the two always say the same thing.

The facts are grouped as data (store label and scan counts), preprocess (grid, spacing, version, windows), recipe
(method, architecture and the training settings) and held-out metrics; plus provenance (the git commit).
No paths, patient or study ids: a store is named by its label (headct.run_meta.label). Nothing that differs
between two runs of the same inputs either (no run id, no timing): the card is part of the model directory, a DVC
output, and a re-run that reproduces the weights must reproduce the directory, or every later stage re-runs.
The registered version already links its run (tag `run_id`). Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from headct.io import write_text
from headct.run_meta import label

CARD = "README.md"
SECTIONS = (("data", "Data"), ("preprocess", "Preprocessing"), ("recipe", "Recipe"),
            ("heldout", "Held-out metrics"), ("provenance", "Provenance"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return " x ".join(map(_fmt, value)) if all(isinstance(v, int | float) for v in value) else ", ".join(
            map(_fmt, value))
    return str(value)


def render(facts: Mapping[str, Any], title: bool = True) -> str:
    """Markdown: a title (the card's; a registry description has the model's own name above it) and one bullet
    list per section, in the order of SECTIONS; empty sections and None values are left out."""
    lines = [f"# {facts['title']}", ""] if title else []
    if facts.get("summary"):
        lines += [str(facts["summary"]), ""]
    for key, heading in SECTIONS:
        items = [(k, v) for k, v in (facts.get(key) or {}).items() if v is not None]
        if not items:
            continue
        lines += [f"## {heading}", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in items]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_card(model_dir: Path, facts: Mapping[str, Any]) -> Path:
    """`<model_dir>/README.md` from `facts` (atomic)."""
    path = Path(model_dir) / CARD
    write_text(path, render(facts))
    return path


def _preprocess(preprocess: Mapping[str, Any], windows: list[Any]) -> dict[str, Any]:
    windows = [w.model_dump(mode="json") if hasattr(w, "model_dump") else dict(w) for w in windows]
    return {"grid (voxels)": preprocess.get("shape"), "spacing (mm)": preprocess.get("spacing_mm"),
            "orientation": preprocess.get("orientation"), "preprocess version": preprocess.get("version"),
            "windows (level/width HU)": ", ".join(f"{w.get('name', '')} {w['level']:g}/{w['width']:g}".strip()
                                                  for w in windows) or None}


def pretrain_facts(cfg: Any, data: Mapping[str, Any], preprocess: Mapping[str, Any], metrics: Mapping[str, Any],
                   provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Facts of a pre-trained encoder: cfg is the PretrainConfig, data the job's data provenance (counts),
    metrics its metrics.json content, provenance {"git commit": ...}."""
    method = cfg.method.upper()
    cnn = cfg.arch == "cnn"
    model = "small 3D CNN" if cnn else f"ViT-{cfg.arch} p{cfg.patch_size}"
    recipe = {"method": method, "architecture": "small 3D CNN (4 strided residual units)" if cnn else
              f"ViT-{cfg.arch} 3D, patch {cfg.patch_size}" + (f", {cfg.num_registers} registers"
                                                              if cfg.num_registers else ""),
              "samples": metrics.get("samples"), "steps": metrics.get("steps"), "batch size": cfg.batch_size,
              "ranks": metrics.get("world_size"), "peak lr": cfg.lr, "weight decay": cfg.weight_decay,
              "seed": cfg.seed}
    if cfg.method == "mae":
        recipe.update({"mask ratio": cfg.mask_ratio, "normalised pixel loss": cfg.norm_pix_loss})
    elif cfg.method == "mim":
        recipe.update({"mask ratio (8^3-voxel cubes)": cfg.mask_ratio})
    else:
        recipe.update({"crops (global + local)": f"{cfg.dino.global_crops} + {cfg.dino.local_crops}",
                       "prototypes": cfg.dino.out_dim})
    loss = {"mae": "masked-patch MSE", "mim": "masked-cube MSE"}.get(cfg.method, "self-distillation cross-entropy")
    return {
        "title": f"headct encoder: {method} {model}",
        "summary": f"A {'3D CNN' if cnn else '3D ViT'} pre-trained self-supervised on non-contrast head CT; load it with "
                   "`headct.load_encoder(<this folder>)` (the preprocessing below is re-applied).",
        "data": {"store": label(data.get("store")), "training scans": data.get("train_scans"),
                 "training patients": data.get("train_patients"), "pool scans": data.get("pool_scans"),
                 "val patients in training": data.get("val_in_training"),
                 "held-out scans (val patients, never trained on)": data.get("heldout_scans"),
                 "test": "never read"},
        "preprocess": _preprocess(preprocess, list(cfg.windows)),
        "recipe": recipe,
        "heldout": {f"{loss} at start": metrics.get("heldout_loss_start"),
                    f"{loss} at end": metrics.get("heldout_loss_end"),
                    "feature spread (DINO collapse check)": metrics.get("heldout_feature_spread")},
        "provenance": dict(provenance),
    }


def finetune_facts(cfg: Any, model_name: str, counts: Mapping[str, int], labels: list[str],
                   preprocess: Mapping[str, Any], windows: list[Mapping[str, Any]], metrics: Mapping[str, Any],
                   provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Facts of a fine-tuned classifier: counts {split: scans}, metrics the job's metrics.json content."""
    heldout: dict[str, Any] = {"mean test AUROC": metrics.get("mean_test_auroc"),
                               "best epoch's mean val AUROC": metrics.get("best_val_auroc_mean")}
    for name, m in (metrics.get("labels") or {}).items():
        low, high = m.get("auroc_low"), m.get("auroc_high")
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        heldout[f"test AUROC {name} (95% CI)"] = f"{m['auroc']:.3f}{ci} ({m.get('n_pos')} pos / {m.get('n_neg')} neg)"
    backbone = cfg.arch if cfg.arch != "vit" else f"ViT ({cfg.init} init)"
    return {
        "title": f"headct classifier: {model_name}, {len(labels)} label(s)",
        "summary": "An encoder fine-tuned with a linear head per finding; `headct predict STUDY --classifier "
                   "<this folder>` runs it on one study through the same ingest checks.",
        "data": {"store": label(cfg.splits), **{f"{s} scans": n for s, n in counts.items()},
                 "labels": ", ".join(labels), "trained on": ", ".join(cfg.train_splits)},
        "preprocess": _preprocess(preprocess, windows),
        "recipe": {"backbone": backbone, "pooling": cfg.pool, "epochs": cfg.epochs,
                   "best epoch (on val)": (metrics.get("best_epoch") or 0) + 1, "batch size": cfg.batch_size,
                   "backbone lr": cfg.backbone_lr, "head lr": cfg.head_lr, "weight decay": cfg.weight_decay,
                   "layer decay": cfg.layer_decay, "drop path": cfg.drop_path_rate or None, "seed": cfg.seed},
        "heldout": heldout,
        "provenance": dict(provenance),
    }
