"""Shared helpers of the ingest tests: a small config, one call of ingest, and reading the store back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from dicom_factory import MARKER_LPS
from rich.console import Console

from headct.config import IngestConfig, PreprocessSpec, QcRules
from headct.data import store
from headct.data.ingest import ingest

# The tests' pseudonym key (HEADCT_PSEUDONYM_KEY): their DICOM is made by tests/dicom_factory.py, not by
# `headct synth`, so it is real data to ingest, which the public demo key is refused for.
TEST_KEY = "headct-tests-only-pseudonym-key-not-the-demo-key"
SPEC = PreprocessSpec(shape=(32, 32, 32), spacing_mm=6.0)  # 192 mm field of view
RULES = QcRules(min_slices=8, min_coverage_mm=30.0)  # test series are 8-32 slices, 5 mm apart


def make_cfg(tmp: Path, **kw) -> IngestConfig:
    base = dict(src=tmp / "src", dest=tmp / "store", labels=None, labels_format="none", patient_key="dicom",
                workers=1, linkage=tmp / "private" / "link.csv", report_dir=tmp / "reports",
                preprocess=SPEC, qc=RULES)
    return IngestConfig(**{**base, **kw})


def run_ingest(cfg: IngestConfig) -> dict:
    return ingest(cfg, cfg.src.parent, Console(quiet=True)).summary


def only_volume(cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    manifest = store.read_manifest(cfg.dest)
    assert len(manifest) == 1
    row = manifest.iloc[0]
    return store.read_volume(cfg.dest, row["volume"]), store.affine_of(row), row


def marker_ras(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm of the marker block: centroid of voxels above bone (1000 HU), weighted by their excess."""
    weight = np.clip(vol.astype(float) - 1000.0, 0, None)
    index = np.array([(np.indices(vol.shape)[a] * weight).sum() / weight.sum() for a in range(3)])
    return affine[:3, :3] @ index + affine[:3, 3]


EXPECTED_MARKER_RAS = np.array([-MARKER_LPS[0], -MARKER_LPS[1], MARKER_LPS[2]])  # left = -x, anterior = +y


def hu_at(vol: np.ndarray, affine: np.ndarray, ras: tuple[float, float, float]) -> int:
    """The stored HU of the canonical voxel nearest to a RAS mm point."""
    inverse = np.linalg.inv(affine)
    i, j, k = np.rint(inverse[:3, :3] @ np.asarray(ras, float) + inverse[:3, 3]).astype(int)
    return int(vol[i, j, k])
