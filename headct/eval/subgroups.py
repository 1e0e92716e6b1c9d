"""AUROC by acquisition subgroup (manufacturer, kernel, slice-thickness bucket, site) from the store's manifest.

A subgroup with fewer than `min_count` positives or negatives is reported as skipped with the reason, never as
a number computed from a handful of scans.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from headct.eval.metrics import auroc

SUBGROUP_COLUMNS: tuple[str, ...] = ("manufacturer", "kernel", "slice_thickness", "site")
THICKNESS_EDGES_MM: tuple[float, ...] = (1.5, 3.5)  # thin (< 1.5 mm), medium [1.5, 3.5), thick (>= 3.5 mm)


def thickness_bucket(mm: pd.Series) -> pd.Series:
    """Slice thickness in mm -> 'thin <1.5mm' / 'medium 1.5-3.5mm' / 'thick >=3.5mm' (missing stays missing)."""
    values = pd.to_numeric(mm, errors="coerce")
    names = np.array(["thin <1.5mm", "medium 1.5-3.5mm", "thick >=3.5mm"], dtype=object)
    out = pd.Series(
        names[np.searchsorted(THICKNESS_EDGES_MM, values.fillna(0).to_numpy(), side="right")],
        index=mm.index,
        dtype=object,
    )
    return out.where(values.notna())


def subgroup_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """scan_id -> one column per subgroup variable present in the manifest (missing and '' become NaN)."""
    out = pd.DataFrame({"scan_id": manifest["scan_id"].astype(str)})
    for column in ("manufacturer", "kernel", "site"):
        if column in manifest.columns:
            out[column] = (
                manifest[column].astype(object).where(manifest[column].astype(str).str.strip() != "")
            )
    if "slice_thickness_mm" in manifest.columns:
        out["slice_thickness"] = thickness_bucket(manifest["slice_thickness_mm"])
    return out


def subgroup_auroc(
    y: np.ndarray, score: np.ndarray, groups: pd.DataFrame, min_count: int = 5
) -> dict[str, dict[str, dict[str, Any]]]:
    """{variable: {value: {"auroc", "n_pos", "n_neg"} or {"skipped": reason, ...}}}.

    Args:
        y, score: (n,) targets and scores; groups: n rows (aligned), one column per subgroup variable.
        min_count: the fewest positives and negatives a subgroup needs for an AUROC.
    """
    y = np.asarray(y)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variable in groups.columns:
        values = groups[variable].to_numpy(dtype=object)
        known = pd.notna(values)
        if known.sum() == 0:
            continue
        out[variable] = {}
        for value in sorted({str(v) for v in values[known]}):
            member = known & (values.astype(str) == value)
            n_pos, n_neg = int((y[member] == 1).sum()), int((y[member] == 0).sum())
            entry: dict[str, Any] = {"n_pos": n_pos, "n_neg": n_neg}
            if min(n_pos, n_neg) < min_count:
                entry["skipped"] = f"{n_pos} positive(s), {n_neg} negative(s) (min {min_count} of each)"
            else:
                entry["auroc"] = auroc(y[member], score[member])
            out[variable][value] = entry
    return out
