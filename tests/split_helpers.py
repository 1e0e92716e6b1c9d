"""A fake canonical store for the split tests (tests/test_split.py, tests/test_split_pool.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_store(root: Path, n_patients: int = 100, seed: int = 0) -> Path:
    """A fake store: 1-4 scans per patient; ICH common, EDH in exactly 3 patients; some scans without labels."""
    rng = np.random.default_rng(seed)
    store = root / "data" / "store" / "synth"
    (store / "volumes").mkdir(parents=True)
    manifest, labels = [], []
    edh_patients = set(rng.choice(n_patients, 3, replace=False).tolist())
    for p in range(n_patients):
        ich = int(rng.random() < 0.3)
        for s in range(int(rng.integers(1, 5))):
            scan = f"ser_{p:04d}{s:012d}"
            manifest.append({"scan_id": scan, "patient_id": f"pat_{p:016d}", "volume": f"volumes/{scan}.npy"})
            if p % 17 == 5 and s == 0:
                continue  # no labels row: pre-training-only scan
            labels.append(
                {
                    "scan_id": scan,
                    "patient_id": f"pat_{p:016d}",
                    "ICH": ich,
                    "EDH": int(p in edh_patients),
                    "Tumor": "" if p % 2 else 0,
                }
            )
    pd.DataFrame(manifest).assign(kvp=120.0).to_parquet(store / "manifest.parquet")
    pd.DataFrame(labels).to_csv(store / "labels.csv", index=False)
    return store
