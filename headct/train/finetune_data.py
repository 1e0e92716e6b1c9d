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
    # the model directory's encoder or its random twin (a ViT, or the mim CNN), else a model from scratch
    name = cfg.arch if not from_model_dir(cfg) else "pretrained" if cfg.init == "pretrained" else "random_init"
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

    check_attention_heads(cfg)  # a setting that cannot work: refused before any data is read
    parts = [read_pool(cfg.splits) if name == "pool" else read_split(cfg.splits, name) for name in cfg.train_splits]
    train = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    val = read_split(cfg.splits, "val")
    shared = set(train["patient_id"]) & set(val["patient_id"])
    if shared:
        raise InputError(f"{cfg.splits}: {len(shared)} patient(s) in both {' + '.join(cfg.train_splits)} and "
                         "val.csv")
    labels, skipped = choose_labels(cfg, train, val)
    preprocess = read_preprocess(split_store(cfg.splits, root))
    if from_model_dir(cfg):  # the encoder must have been trained on the store's recipe (before any training)
        from headct.data.volumes import check_preprocessing
        from headct.models.model_dir import CONFIG, read_config

        check_preprocessing(cfg.splits, root, read_config(cfg.model_dir), cfg.model_dir / CONFIG,
                            allow_mismatch=cfg.allow_preprocess_mismatch, setting="finetune.allow_preprocess_mismatch")
    return FinetuneData(train, val, labels, skipped, preprocess, model_name(cfg))


def from_model_dir(cfg: Any) -> bool:
    """Whether the backbone comes from `cfg.model_dir`: a ViT (pre-trained or its random twin), the small CNN
    with init pretrained (a masked-restoration model directory), or its restoration read out by the residual (pool
    residual; the random twin too: the directory sets its mask ratio, windows and preprocessing); ResNets and the
    CNN from scratch do not."""
    return cfg.arch == "vit" or (cfg.arch == "cnn" and (cfg.init == "pretrained" or cfg.pool == "residual"))


def backbone_width(cfg: Any) -> tuple[int, str]:
    """(token width D of the backbone `cfg` asks for, where that width comes from), without reading weights."""
    if cfg.arch == "cnn":
        from headct.models.cnn import DEFAULT_CHANNELS

        return DEFAULT_CHANNELS[-1], "the small CNN"
    if cfg.arch != "vit":
        from headct.models.resnet import EMBED_DIM

        return EMBED_DIM, f"the {cfg.arch}"
    from headct.models.model_dir import CONFIG, read_config
    from headct.models.vit import build_encoder

    arch = read_config(cfg.model_dir)["arch"]
    width = arch.get("embed_dim")
    if width is None:  # a size's default width
        try:
            width = build_encoder(arch).embed_dim
        except (TypeError, ValueError) as exc:
            raise InputError(f"{cfg.model_dir / CONFIG}: unusable arch ({exc})") from None
    return int(width), str(cfg.model_dir / CONFIG)


def check_attention_heads(cfg: Any) -> None:
    """With `pool: attentive` the head count must divide the encoder width: ConfigError (exit 2) naming the key,
    the width and the allowed counts, before any training (the head refuses it too; never lowered quietly)."""
    from headct.config.finetune import MAX_ATTENTION_HEADS
    from headct.errors import ConfigError
    from headct.models.heads import head_counts

    if cfg.pool != "attentive":
        return
    width, source = backbone_width(cfg)
    if width % cfg.attention_heads:
        raise ConfigError(f"finetune.attention_heads={cfg.attention_heads} does not divide the encoder width "
                          f"{width} ({source}); allowed: {head_counts(width, MAX_ATTENTION_HEADS)}")


def build_classifier(cfg: Any, data: FinetuneData, root: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    """A fresh classifier (seeded) -> (classifier, HU windows, preprocess spec for its directory). A ViT's model
    directory was checked against the store's preprocessing by `load_data`."""
    import torch

    from headct.config.base import DEFAULT_WINDOWS
    from headct.models.heads import Classifier
    from headct.models.model_dir import load_model_dir, read_config
    from headct.models.resnet import build_backbone
    from headct.models.vit import build_encoder

    torch.manual_seed(cfg.seed)
    if cfg.pool == "residual":  # the restoration of a mim directory (or its seeded twin) read out by its residual
        backbone, config = residual_backbone(cfg)
        windows, preprocess = config["windows"], config["preprocess"]
    elif cfg.arch == "cnn" and cfg.init == "pretrained":  # the small CNN a masked-restoration (mim) run pre-trained
        from headct.errors import InputError
        from headct.models.model_dir import CONFIG

        backbone, config = load_model_dir(cfg.model_dir)
        if config["arch"].get("name") != "cnn":
            raise InputError(f"{cfg.model_dir / CONFIG}: finetune.arch=cnn with init=pretrained starts from a "
                             "small-CNN model directory (pretrain.method mim); this one holds a "
                             f"{config['arch'].get('name')!r} encoder. Set finetune.arch=vit for it, or "
                             "finetune.init=random to train the small CNN from scratch")
        windows, preprocess = config["windows"], config["preprocess"]
    elif cfg.arch != "vit":  # a CNN from scratch: the default windows, the store's recipe
        windows = [w.model_dump(mode="json") for w in DEFAULT_WINDOWS]
        backbone = build_backbone({"name": cfg.arch, "in_chans": len(windows)})
        preprocess = data.preprocess
    else:
        if cfg.init == "pretrained":
            backbone, config = load_model_dir(cfg.model_dir)
        else:
            config = read_config(cfg.model_dir)
            backbone = build_encoder(config["arch"])
        backbone.set_drop_path_rate(cfg.drop_path_rate)  # no parameters: the weights load the same
        windows, preprocess = config["windows"], config["preprocess"]
    classifier = Classifier(backbone, cfg.pool, len(data.labels), cfg.attention_heads)
    return classifier, windows, preprocess


def residual_backbone(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """(`ResidualReadout` of the masked-restoration model of `cfg.model_dir`, or of the same architecture at a
    random init drawn from the current torch seed; the directory's config). InputError unless the directory is a
    mim run of the small CNN."""
    from headct.errors import InputError
    from headct.models.model_dir import (
        CONFIG,
        RESTORATION_HEAD,
        build_model_encoder,
        load_model_dir,
        load_restoration,
        read_config,
        restoration_mask_ratio,
    )
    from headct.models.restoration import MaskedRestoration, ResidualReadout

    config = read_config(cfg.model_dir)
    if config["arch"].get("name") != "cnn" or config.get("method") != "mim":
        raise InputError(f"{cfg.model_dir / CONFIG}: finetune.pool=residual reads a masked-restoration model "
                         f"directory (pretrain.method mim, arch cnn, with {RESTORATION_HEAD}); this one holds a "
                         f"{config['arch'].get('name')!r} encoder of method {config.get('method')!r}")
    if cfg.init == "pretrained":
        encoder, config = load_model_dir(cfg.model_dir)
        restoration = load_restoration(cfg.model_dir, encoder, config)
    else:
        restoration = MaskedRestoration(build_model_encoder(config["arch"]),
                                        restoration_mask_ratio(cfg.model_dir, config))
    return ResidualReadout(restoration.train()), config


def layer_decay_groups(weight_decay: float, layer_decay: float) -> Any:
    """classifier -> its ViT backbone's AdamW groups with layer-wise lr decay (`headct.train.param_groups`); each
    group's `lr_scale` multiplies backbone_lr."""
    from headct.train.param_groups import param_groups

    def groups(classifier: Any) -> list[dict[str, Any]]:
        return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g["lr_scale"]}
                for g in param_groups(classifier.backbone, weight_decay, layer_decay=layer_decay, head_modules=())]

    return groups


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
    if backbone_groups is None and cfg.layer_decay is not None:
        backbone_groups = layer_decay_groups(cfg.weight_decay, cfg.layer_decay)
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
