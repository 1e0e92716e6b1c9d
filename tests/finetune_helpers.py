"""Builders for the fine-tuning tests (and the tune tests): a labelled 32^3 store, its split, a tiny model directory,
and the job's config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from headct.config import FinetuneConfig, PreprocessSpec
from headct.models.model_dir import save_model_dir
from headct.models.vit import build_encoder
from tests.store_helpers import write_store

SIZE = 32
TINY_ARCH = {"name": "tiny", "img_size": [SIZE] * 3, "patch_size": 16, "in_chans": 3, "embed_dim": 32,
             "depth": 1, "num_heads": 2}
WINDOWS = [{"name": "brain", "level": 40, "width": 80}, {"name": "subdural", "level": 80, "width": 200},
           {"name": "bone", "level": 600, "width": 2800}]


def make_labelled_project(root: Path, n_patients: int = 12) -> Path:
    """A 32^3 store, 1 scan per patient, labels ICH (a bright blob: learnable) and SDH (noise), a split of
    6 train / 3 val / 3 test patients, and a tiny pre-trained-looking model directory."""
    rng = np.random.default_rng(0)
    spec = PreprocessSpec(shape=(SIZE, SIZE, SIZE), spacing_mm=6.0)
    preprocess = {**spec.model_dump(mode="json"), "version": spec.version}
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    dist = np.sqrt((g ** 2).sum(0))
    rows, volumes = [], {}
    ich = [1, 0] * (n_patients // 2)
    sdh = [1, 1, 0, 0] * (n_patients // 4)
    for i in range(n_patients):
        vol = np.where(dist < 0.75, 1000.0, -1024.0)
        vol[dist < 0.65] = 35.0
        if ich[i]:
            vol[np.sqrt(((g - np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 0.2] = 70.0
        vol += rng.normal(0, 5, vol.shape)
        scan = f"ser_{i:016x}"
        volumes[scan] = vol.astype(np.int16)
        rows.append(f"data/store/t/volumes/{scan}.npy,{scan},pat_{i:016x},{ich[i]},{sdh[i]}\n")
    write_store(root / "data/store/t", volumes, {s: f"pat_{s[4:]}" for s in volumes}, spec)
    splits = root / "data/splits/t"
    splits.mkdir(parents=True)
    header = "img_path,scan_id,patient_id,ICH,SDH\n"
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    train, val, test = order[:6], [6, 7, 9], [8, 10, 11]  # val: ICH 1,0,0 SDH 0,0,1 ... see asserts below
    for name, idx in (("train", train), ("val", val), ("test", test)):
        (splits / f"{name}.csv").write_text(header + "".join(rows[i] for i in idx))
    (splits / "split.json").write_text(json.dumps({"store": "data/store/t", "seed": 0}))
    torch.manual_seed(0)
    save_model_dir(root / "models/mae", build_encoder(TINY_ARCH),
                   {"preprocess": preprocess, "windows": WINDOWS, "method": "mae", "provenance": {}})
    return root


def finetune_cfg(root: Path, **kw) -> FinetuneConfig:
    base = dict(splits=root / "data/splits/t", model_dir=root / "models/mae", out_dir=root / "models/classifier",
                report_dir=root / "reports/finetune", checkpoint_dir=root / "ckpt", tuned_params=None,
                epochs=2, batch_size=2, backbone_lr=1e-4, head_lr=1e-2, warmup_frac=0.0, bootstrap=20,
                min_positives=1, threads=1, eval_batch_size=4, register_as=None)
    return FinetuneConfig(**{**base, **kw})
