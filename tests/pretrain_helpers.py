"""Builders for the pre-training tests (and the distributed, explain and DDP-worker tests that reuse them): a tiny
store of head-like volumes with a split, the job's config and context."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headct.config import JobContext, PreprocessSpec, PretrainConfig, TrackingConfig
from tests.store_helpers import write_store

SIZE = 32


def make_project(root: Path, n_scans: int = 16) -> Path:
    """A store of n_scans 32^3 int16 volumes (air, skull shell, brain, a blob), 2 scans per patient, and a
    split: train 8 scans, val 4, test = an unreadable file (the job must never open it)."""
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    rows, volumes, patients = [], {}, {}
    for i in range(n_scans):
        dist = np.sqrt(((g - rng.uniform(-0.1, 0.1, (3, 1, 1, 1))) ** 2).sum(0))
        vol = np.where(dist < 0.75, 1000.0, -1024.0)
        vol[dist < 0.65] = 35.0
        vol += rng.normal(0, 5, vol.shape)
        scan = f"ser_{i:016x}"
        volumes[scan], patients[scan] = vol.astype(np.int16), f"pat_{i // 2:016x}"
        rows.append(f"data/store/t/volumes/{scan}.npy,{scan},pat_{i // 2:016x},{i % 3 == 0:d}\n")
    write_store(root / "data/store/t", volumes, patients, PreprocessSpec(shape=(SIZE, SIZE, SIZE), spacing_mm=6.0))
    splits = root / "data/splits/t"
    splits.mkdir(parents=True)
    header = "img_path,scan_id,patient_id,ICH\n"
    (splits / "train.csv").write_text(header + "".join(rows[:8]))
    (splits / "val.csv").write_text(header + "".join(rows[8:12]))
    (splits / "test.csv").write_text("this is not a split file\n")
    (splits / "split.json").write_text(json.dumps({"store": "data/store/t", "seed": 0}))
    return root


def make_cfg(root: Path, **kw) -> PretrainConfig:
    base = dict(splits=root / "data/splits/t", model_dir=root / "models/mae", checkpoint_dir=root / "ckpt",
                report_dir=root / "reports/pretrain", arch="tiny", patch_size=16, batch_size=2, samples=16,
                lr=1e-3, eval_volumes=2, log_every=2, checkpoint_every=100, threads=1)
    return PretrainConfig(**{**base, **kw})


def ctx_for(root: Path) -> JobContext:
    return JobContext(root=root, tracking=TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", experiment="test"))
