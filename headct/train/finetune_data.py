"""What a fine-tuning run trains, on what, and the call that trains it: shared by `headct finetune` and every
`headct tune` trial, so both read the data, choose the labels and build the model the same way.

Data: train (or the splits `train_splits` names: train and pool for the supervised ceiling) and val of the split
(never test), the labels to train (the job's `labels`, each needing
`min_positives` positives and negatives in train and val, `headct.eval.labels.skip_reason`) and the preprocessing
spec of the split's store. Model: the pre-trained encoder of `model_dir`, its seeded random-init twin, or a MONAI
3D ResNet from scratch, with a fresh head (`headct.models.heads.Classifier`). Heavy libraries are imported inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from headct.errors import InputError


@dataclass
class FinetuneData:
    """What fine-tuning reads before the end: train/val frames, the trained labels, the store's grid."""

    train: Any
    val: Any
    labels: list[str]
    skipped: dict[str, str]
    preprocess: dict[str, Any]
    model_name: str


def model_name(cfg: Any) -> str:
    """The `model` column of the predictions: pretrained, random_init, or the ResNet's name; prefixed with
    `ceiling_` when trained on the pool's labels too (the supervised ceiling, e.g. ceiling_resnet18)."""
    name = cfg.arch if cfg.arch != "vit" else "pretrained" if cfg.init == "pretrained" else "random_init"
    return f"ceiling_{name}" if "pool" in cfg.train_splits else name


def targets_of(frame: Any, labels: list[str]) -> np.ndarray:
    """(n, L) float32 targets of a split frame: 1/0, NaN where the label is unknown."""
    return np.stack([frame[label].astype("Float32").to_numpy(dtype=np.float32, na_value=np.nan)
                     for label in labels], axis=1) if labels else np.zeros((len(frame), 0), np.float32)


def choose_labels(cfg: Any, train: Any, val: Any) -> tuple[list[str], dict[str, str]]:
    """The labels to train (each with `min_positives` positives and negatives in train and val) and, for the
    others, why they are left out."""
    from headct.eval.labels import requested_labels, skip_reason

    frames = {"train": train, "val": val}
    chosen, skipped = [], {}
    for label in requested_labels(cfg.labels, frames, cfg.splits):
        reason = skip_reason({name: frame[label] for name, frame in frames.items()}, cfg.min_positives)
        if reason is None:
            chosen.append(label)
        else:
            skipped[label] = reason
    if not chosen:
        raise InputError(f"{cfg.splits}: no label has enough positives and negatives in train and val: {skipped}")
    return chosen, skipped


def load_data(cfg: Any, root: Any) -> FinetuneData:
    """Train and val (never test) of `cfg.splits` (a FinetuneConfig), the labels to train and the preprocessing
    spec of the split's store."""
    import pandas as pd

    from headct.data.splits import read_pool, read_split
    from headct.data.store import read_preprocess
    from headct.data.volumes import split_store

    parts = [read_pool(cfg.splits) if name == "pool" else read_split(cfg.splits, name) for name in cfg.train_splits]
    train = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    val = read_split(cfg.splits, "val")
    shared = set(train["patient_id"]) & set(val["patient_id"])
    if shared:
        raise InputError(f"{cfg.splits}: {len(shared)} patient(s) in both {' + '.join(cfg.train_splits)} and "
                         "val.csv")
    labels, skipped = choose_labels(cfg, train, val)
    preprocess = read_preprocess(split_store(cfg.splits, root))
    return FinetuneData(train, val, labels, skipped, preprocess, model_name(cfg))


def build_classifier(cfg: Any, data: FinetuneData, root: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    """A fresh classifier (seeded) -> (classifier, HU windows, preprocess spec for its directory). A ViT's model
    directory must have been trained on the store's preprocessing (`check_preprocessing`)."""
    import torch

    from headct.config.base import DEFAULT_WINDOWS
    from headct.data.volumes import check_preprocessing
    from headct.models.heads import Classifier
    from headct.models.model_dir import CONFIG, load_model_dir, read_config
    from headct.models.resnet import ResNetBackbone
    from headct.models.vit import build_encoder

    torch.manual_seed(cfg.seed)
    if cfg.arch != "vit":
        windows = [w.model_dump(mode="json") for w in DEFAULT_WINDOWS]
        backbone = ResNetBackbone(cfg.arch, in_chans=len(windows))
        preprocess = data.preprocess
    else:
        if cfg.init == "pretrained":
            backbone, config = load_model_dir(cfg.model_dir)
        else:
            config = read_config(cfg.model_dir)
            backbone = build_encoder(config["arch"])
        check_preprocessing(cfg.splits, root, config, cfg.model_dir / CONFIG)
        windows, preprocess = config["windows"], config["preprocess"]
    classifier = Classifier(backbone, cfg.pool, len(data.labels), cfg.attention_heads)
    return classifier, windows, preprocess


def train_classifier(
    cfg: Any, root: Any, data: FinetuneData, device: Any, *, epochs: int | None = None,
    backbone_groups: Any = None, on_epoch: Any = None, on_log: Any = None, save_state: Any = None,
    resume: dict[str, Any] | None = None,
) -> tuple[Any, list[Any], dict[str, Any], Any]:
    """Build and fine-tune a classifier on train, selecting on val -> (classifier at its best epoch, windows,
    preprocess, FitResult). `backbone_groups`: a function classifier -> backbone parameter groups (e.g.
    layer-wise lr decay, see `headct.train.finetune.param_groups`), or None."""
    from headct.data.volumes import LabelledVolumeDataset
    from headct.device import amp_dtype
    from headct.train.finetune import FitSettings, fit

    classifier, windows, preprocess = build_classifier(cfg, data, root)
    shape = preprocess.get("shape") or data.preprocess.get("shape")
    train_set = LabelledVolumeDataset([root / p for p in data.train["img_path"]], list(data.train["scan_id"]),
                                      targets_of(data.train, data.labels), shape)
    settings = FitSettings.from_config(cfg, amp_dtype=amp_dtype(cfg.amp, device),
                                       **({"epochs": epochs} if epochs is not None else {}))
    result = fit(classifier, train_set, [root / p for p in data.val["img_path"]], targets_of(data.val, data.labels),
                 data.labels, windows, settings, device,
                 backbone_groups=backbone_groups(classifier) if backbone_groups is not None else None,
                 on_epoch=on_epoch, on_log=on_log, save_state=save_state, resume=resume)
    classifier.load_state_dict(result.best_state, strict=True)
    return classifier, windows, preprocess, result
