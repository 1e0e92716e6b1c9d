"""The generator's truth table (`truth.csv` beside reads.csv): what each synthetic study really holds.

Not a label file: the labels are the readers' (reads.csv -> labels.csv). The truth is for analysis only: lesion
volumes, the severity stratum, the mass effect measured on the phantom, and the ORACLE feature, which `headct
ingest` carries into the store's `meta.csv` keyed by pseudonyms (headct/data/store_meta.py).

Columns (one row per study; volumes in mL, empty where the study has no such finding):
    name                 the CQ500-style patient name (`SYN-CT-<n>`), the join key with reads.csv
    findings             `<kind>:<side>` joined by `;` (sides L, R, both)
    <kind>_ml            painted volume of each finding kind (partial-volume weighted, oedema excluded)
    bleed_ml             total haemorrhage volume (sum over BLEEDS); 0 without ICH
    stratum              severity stratum of bleed_ml (STRATA); empty without ICH
    midline_shift_mm, displacement_mm   mass effect measured on the phantom (patient mm)
    oracle_series        the series ingest selects with its default rules (`thin` if present, else `axial`)
    oracle_noise_hu      that series' noise SD in the brain (HU)
    visible_<group>_<s>mm   ORACLE: voxels of a grid of spacing s where the group's lesions change the noise-free
                         image by >= VISIBLE_SD noise SDs (headct/data/synth/oracle.py); groups: each finding
                         kind, `bleed` (all haemorrhages, for ICH), `fracture` (both kinds, for Fracture)
    reader_flips, age    where a reader disagreed (`R<r>:<label>`); the subject's age (years)

Severity strata are fixed here, in one place, before any result: < 5 mL, 5-30 mL, > 30 mL of blood (30 mL is
the ICH-score volume threshold, Hemphill et al., Stroke 2001; 5 mL separates the few-voxel bleeds at 3 mm).
A stratum's AUROC is its positives against ALL negatives (headct/eval/learnability.py).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from headct.errors import InputError
from headct.io import atomic_path

TRUTH = "truth.csv"
# The generator's finding kinds (findings.py paints them) and the groups the labels derive from.
FINDINGS = ("IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed", "CalvarialFracture", "OtherFracture", "Tumor")
BLEEDS = ("IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed")
FRACTURES = ("CalvarialFracture", "OtherFracture")
STRATA: tuple[tuple[str, float, float], ...] = (  # (name, lower mL inclusive, upper mL exclusive)
    ("<5mL", 0.0, 5.0),
    ("5-30mL", 5.0, 30.0),
    (">30mL", 30.0, math.inf),
)
ORACLE_SPACINGS_MM = (2.0, 3.0, 6.0)  # the store grids of the default (2 mm), demo (3 mm) and quick (6 mm) profiles
VISIBLE_SD = 2.0  # a grid voxel is "visible" when the lesion changes it by at least this many noise SDs
ORACLE_GROUPS = (*FINDINGS, "bleed", "fracture")
# Label -> the oracle group that measures it, and the volume column that stratifies it (None: not stratified).
ORACLE_GROUP_OF_LABEL = {"ICH": "bleed", "Fracture": "fracture", **{k: k for k in FINDINGS}}
VOLUME_OF_LABEL = {"ICH": "bleed_ml", **{k: f"{k}_ml" for k in (*BLEEDS, "Tumor")}}


def stratum_of(volume_ml: float) -> str:
    """The severity stratum of a bleed volume (mL); "" for no bleed (0 or NaN)."""
    if not volume_ml > 0:
        return ""
    return next(name for name, lo, hi in STRATA if lo <= volume_ml < hi)


def visible_column(group: str, spacing_mm: float) -> str:
    return f"visible_{group}_{spacing_mm:g}mm"


def columns() -> list[str]:
    return ["name", "findings", *(f"{k}_ml" for k in FINDINGS), "bleed_ml", "stratum", "midline_shift_mm",
            "displacement_mm", "oracle_series", "oracle_noise_hu",
            *(visible_column(g, s) for s in ORACLE_SPACINGS_MM for g in ORACLE_GROUPS), "reader_flips", "age"]


def write_truth(path: Path, rows: list[dict[str, object]]) -> None:
    """Write truth rows (dicts keyed by `columns()`; missing keys are empty) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(), restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_truth(path: Path) -> pd.DataFrame:
    """A truth.csv as a frame (numeric columns as floats, NaN where empty). Raises InputError naming the file
    when it is unreadable, lacks a column, holds a non-number or a negative volume or count, repeats a name, or
    gives a stratum that disagrees with its bleed volume."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: not a readable truth table ({err})") from err
    missing = [c for c in columns() if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing truth column(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if (table["name"] == "").any() or table["name"].duplicated().any():
        raise InputError(f"{path}: every row needs a name, once")
    numeric = [c for c in columns() if c.endswith(("_ml", "_mm", "_hu")) or c.startswith("visible_")]
    out = table.copy()
    for column in numeric:
        values = pd.to_numeric(table[column].replace("", None), errors="coerce")
        bad = values.isna() & (table[column] != "")
        if bad.any():
            raise InputError(f"{path}: column {column} holds {table.loc[bad, column].iloc[0]!r}, not a number "
                             f"(row {int(bad.idxmax()) + 2})")
        if (values < 0).any():
            raise InputError(f"{path}: column {column} holds a negative value (row {int((values < 0).idxmax()) + 2})")
        out[column] = values.astype(float)
    expected = out["bleed_ml"].fillna(0.0).map(stratum_of)
    wrong = expected != out["stratum"]
    if wrong.any():
        row = int(wrong.idxmax())
        raise InputError(f"{path}: row {row + 2} has stratum {out.loc[row, 'stratum']!r} but bleed_ml "
                         f"{out.loc[row, 'bleed_ml']} (expected {expected[row]!r})")
    return out
