"""Evaluation: metrics with patient-level confidence intervals, frozen-encoder features, probes, plots.

Kept import-light; submodules import numpy/scikit-learn/torch/matplotlib themselves.
"""

# The predictions CSV contract (DESIGN.md, "Predictions"): one row per scan, label, model and split, so every
# reported number can be recomputed. `k` and `seed` are empty where they do not apply.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "scan_id",
    "patient_id",
    "split",
    "label",
    "model",
    "mode",
    "k",
    "seed",
    "score",
    "target",
    "threshold",
)

# Top-level keys of the probe's metrics.json that are not models (every other key is a model or arm).
PROBE_META_KEYS: tuple[str, ...] = ("skipped", "selection", "diagnostic")
