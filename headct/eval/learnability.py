"""What is visible at the grid: the ORACLE and the HU-histogram baseline, per label and severity stratum.

For a store built from the synthetic generator (its `meta.csv`, headct/data/store_meta.py) and its split files:
  * oracle: the count of grid voxels the label's lesions visibly change (headct/data/synth/oracle.py), used as
    the score as is: no fitting, so it is an upper bound of what any volume-level feature can separate;
  * hu_histogram: the non-learned baseline at its contract defaults (headct/eval/histogram.py), probed with the
    linear-probe protocol (standardise on train, C and threshold on val; headct/eval/probe.py).
Both are scored on the test split: AUROC over all test scans with a known label, and per severity stratum
(headct/data/synth/truth.py STRATA, by the label's own lesion volume), where a stratum's AUROC is its positives
against ALL negatives. 95% intervals come from the patient-level bootstrap (headct/eval/metrics.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headct.data.synth.truth import ORACLE_GROUP_OF_LABEL, STRATA, VOLUME_OF_LABEL, stratum_of
from headct.errors import InputError

MODELS = ("oracle", "hu_histogram")


def read_meta(store: Path) -> pd.DataFrame:
    """The store's meta.csv indexed by scan_id; InputError naming the file when missing or malformed."""
    from headct.data.store_meta import META

    path = Path(store) / META
    if not path.is_file():
        raise InputError(f"{path} not found: the store was not ingested from `headct synth` output with its "
                         "truth.csv (the oracle exists only for synthetic data)")
    try:
        meta = pd.read_csv(path, dtype={"scan_id": str, "patient_id": str, "stratum": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: unreadable ({err})") from err
    if "scan_id" not in meta.columns or meta["scan_id"].duplicated().any():
        raise InputError(f"{path}: needs a `scan_id` column with one row per scan")
    return meta.set_index("scan_id")


def _column(meta: pd.DataFrame, scans: pd.Series, column: str, source: Path) -> np.ndarray:
    if column not in meta.columns:
        raise InputError(f"{source}: no column {column} (the oracle is computed for the grid spacings in "
                         "headct/data/synth/truth.py ORACLE_SPACINGS_MM only)")
    missing = ~scans.isin(meta.index)
    if missing.any():
        raise InputError(f"{source}: scan {scans[missing].iloc[0]} of the split has no row ({int(missing.sum())} "
                         "missing); re-run `headct ingest`")
    return meta.loc[scans.to_numpy(), column].to_numpy(dtype=float)


def auroc_ci(y: np.ndarray, score: np.ndarray, patients: np.ndarray, n_resamples: int, seed: int
             ) -> dict[str, Any]:
    """AUROC with its patient-bootstrap 95% interval and the counts; None values without both classes."""
    from headct.eval.metrics import auroc, patient_bootstrap

    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        return {"auroc": None, "auroc_low": None, "auroc_high": None, "n_pos": n_pos, "n_neg": n_neg}
    boot = patient_bootstrap(y, score, patients, float(np.median(score)), n_resamples, seed)
    low, high = boot.intervals["auroc"]
    return {"auroc": auroc(y, score), "auroc_low": low, "auroc_high": high, "n_pos": n_pos, "n_neg": n_neg}


def by_stratum(y: np.ndarray, score: np.ndarray, patients: np.ndarray, volume: np.ndarray | None,
               n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """{"all": ..., <stratum>: ...}: every positive, then each stratum's positives, against all negatives."""
    out = {"all": auroc_ci(y, score, patients, n_resamples, seed)}
    if volume is None:
        return out
    strata = np.array([stratum_of(v) for v in volume])
    for name, _, _ in STRATA:
        keep = (y == 0) | (strata == name)
        out[name] = auroc_ci(y[keep], score[keep], patients[keep], n_resamples, seed)
    return out


def histogram_features(store: Path, frame: pd.DataFrame) -> np.ndarray:
    """(n, D) HU-histogram features (contract defaults) of the split's scans, read from the store."""
    from headct.data.store import read_volume, volume_relpath
    from headct.eval.histogram import hu_histogram

    return np.concatenate([hu_histogram(read_volume(store, volume_relpath(s))) for s in frame["scan_id"]])


def learnability(store: Path, splits: Path, labels: list[str], n_resamples: int = 1000, seed: int = 0,
                 c_grid: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Test AUROC (with CIs) of the oracle and the HU histogram per label and stratum (module docstring)."""
    from headct.config.evaluate import ProbeConfig
    from headct.data.splits import read_splits
    from headct.eval.probe import fit_probe, label_data

    store, splits = Path(store), Path(splits)
    meta = read_meta(store)
    frames = read_splits(splits)  # checked patient-disjoint
    features = {name: histogram_features(store, frame) for name, frame in frames.items()}
    test = frames["test"]
    results: dict[str, Any] = {model: {} for model in MODELS}
    for label in labels:
        if label not in test.columns:
            raise InputError(f"{splits}: the split files have no label {label!r}")
        known = test[label].notna().to_numpy()
        scans = test.loc[known, "scan_id"].astype(str)
        y = test.loc[known, label].to_numpy(dtype=np.int8)
        patients = test.loc[known, "patient_id"].to_numpy(dtype=str)
        volume_column = VOLUME_OF_LABEL.get(label)
        volume = _column(meta, scans, volume_column, store / "meta.csv") if volume_column else None
        group = ORACLE_GROUP_OF_LABEL.get(label)
        if group is not None:
            oracle = _column(meta, scans, f"visible_{group}", store / "meta.csv")
            results["oracle"][label] = by_stratum(y, oracle, patients, volume, n_resamples, seed)
        data = {name: label_data(frame, features[name], label) for name, frame in frames.items()}
        fit = fit_probe(data["train"], data["val"], c_grid or ProbeConfig().c_grid)
        score = fit.score(data["test"].x)
        results["hu_histogram"][label] = by_stratum(y, score, patients, volume, n_resamples, seed)
    return {"store": str(store), "splits": str(splits), "strata": [s[0] for s in STRATA],
            "bootstrap": n_resamples, "seed": seed, "results": results}


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table: one line per model and label, AUROC [95% CI] (positives) per stratum."""
    columns = ["all", *report["strata"]]
    width = 30
    lines = [f"{'model':<13} {'label':<18} " + " ".join(f"{c:<{width}}" for c in columns)]
    for model, per_label in report["results"].items():
        for label, cells in per_label.items():
            text = []
            for c in columns:
                cell = cells.get(c)
                if cell is None:
                    text.append("-")
                elif cell["auroc"] is None:
                    text.append(f"n/a n+={cell['n_pos']}")
                else:
                    low, high = cell["auroc_low"], cell["auroc_high"]
                    ci = f"[{low:.3f}, {high:.3f}]" if low is not None else "[no CI]"
                    text.append(f"{cell['auroc']:.3f} {ci} n+={cell['n_pos']}")
            lines.append(f"{model:<13} {label:<18} " + " ".join(f"{t:<{width}}" for t in text))
    return "\n".join(lines)
