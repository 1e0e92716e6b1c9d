"""Builders for the probe tests (and the extract tests): a canonical store of random volumes, split files and a tiny
model directory trained (so its config says) on the store's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tests.store_helpers import write_store

TINY_ARCH = {
    "name": "tiny",
    "img_size": [16, 16, 16],
    "patch_size": 8,
    "in_chans": 3,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
}
WINDOWS = [
    {"name": "brain", "level": 40, "width": 80},
    {"name": "subdural", "level": 80, "width": 200},
    {"name": "bone", "level": 600, "width": 2800},
]


def write_volumes(store: Path, n: int, shape=(16, 16, 16)) -> list[Path]:
    """A canonical store of n random int16 volumes ser_0000 .. (manifest, preprocess.json); returns their paths."""
    rng = np.random.default_rng(0)
    volumes = {f"ser_{i:04d}": rng.integers(-1024, 1500, size=shape).astype(np.int16) for i in range(n)}
    return write_store(store, volumes)


def write_splits_and_model(root: Path, rows: list[dict], store: Path | None = None) -> None:
    """train/val/test.csv from rows (each with a "split" key) and a tiny seeded model directory at root/model,
    trained (so its config says) on the preprocessing of `store` (default root/store)."""
    import torch

    from headct.models.model_dir import save_model_dir
    from headct.models.vit import build_encoder

    frame = pd.DataFrame(rows)
    for split, part in frame.groupby("split"):
        part.drop(columns="split").to_csv(root / f"{split}.csv", index=False)
    torch.manual_seed(1)
    config = {
        "windows": WINDOWS,
        "preprocess": json.loads(((store or root / "store") / "preprocess.json").read_text()),
        "method": "mae",
        "provenance": {},
    }
    save_model_dir(root / "model", build_encoder(TINY_ARCH), config)


def make_project(root: Path) -> None:
    """48 scans, 2 per patient sharing the label; train 12 patients (6 positive), val 6, test 6; a tiny model dir."""
    paths = write_volumes(root / "store", 48)
    rows = []
    for i, path in enumerate(paths):
        rows.append(
            {
                "split": "train" if i < 24 else "val" if i < 36 else "test",
                "img_path": path.relative_to(root).as_posix(),
                "scan_id": path.stem,
                "patient_id": f"pat_{i // 2:04d}",
                "ICH": (i // 2) % 2,
                "EDH": int(i in (0, 1, 24, 36)),
            }
        )
    write_splits_and_model(root, rows)
