"""The store-side truth table `meta.csv`: the synthetic generator's truth per accepted scan, under pseudonyms.

`headct synth` writes `truth.csv` beside reads.csv (headct/data/synth/truth.py). After ingest, this carries it
into `<store>/meta.csv`, one row per accepted scan whose study the truth describes:
    scan_id, patient_id, findings, <kind>_ml..., bleed_ml, stratum, midline_shift_mm, displacement_mm,
    oracle_series, oracle_noise_hu, visible_<group>...
The oracle columns `visible_<group>` are those computed at the store's grid spacing (absent when the generator
did not compute that spacing). No names, paths, reader details or ages: the join from a study folder to its
pseudonyms goes through the local linkage file, which stays private. Never a label: labels.csv holds those.
No truth.csv under the source (real data) -> no meta.csv, and a stale one is removed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from headct.config.data import IngestConfig
from headct.data.identity import read_linkage
from headct.data.label_sources.cq500 import patient_key_of_name
from headct.data.synth import truth
from headct.errors import InputError
from headct.io import atomic_path

META = "meta.csv"
_NOT_CARRIED = ("name", "reader_flips", "age")


def study_key(source_folder: str, src: Path) -> str:
    """The CQ500-style key of a series' study: the first word of its top folder under SRC (`SYNCT12`)."""
    folder = Path(source_folder).resolve()
    try:
        top = folder.relative_to(src.resolve()).parts[0]
    except (ValueError, IndexError):
        return ""
    return patient_key_of_name(top.split()[0]) if top.split() else ""


def meta_table(truth_table: pd.DataFrame, linkage: pd.DataFrame, src: Path, spacing_mm: float) -> pd.DataFrame:
    """meta.csv rows: accepted scans of `linkage` joined to `truth_table` by study key (see module docstring)."""
    accepted = linkage[linkage["status"] == "accepted"]
    keys = accepted["source_folder"].map(lambda folder: study_key(str(folder), src))
    by_key = truth_table.set_index(truth_table["name"].map(patient_key_of_name))
    known = keys.isin(by_key.index)
    rows = by_key.loc[keys[known].to_numpy()].reset_index(drop=True)
    spacing = next((s for s in truth.ORACLE_SPACINGS_MM if abs(s - spacing_mm) < 1e-6), None)
    visible = {truth.visible_column(g, spacing): f"visible_{g}" for g in truth.ORACLE_GROUPS} if spacing else {}
    carried = [c for c in truth.columns() if c not in _NOT_CARRIED and not c.startswith("visible_")]
    out = pd.concat([accepted.loc[known, ["scan_id", "patient_id"]].reset_index(drop=True),
                     rows[carried + list(visible)].rename(columns=visible)], axis=1)
    out[list(visible.values())] = out[list(visible.values())].astype("Int64")  # voxel counts
    return out.sort_values("scan_id", kind="stable").reset_index(drop=True)


def write_store_meta(cfg: IngestConfig, root: Path) -> Path | None:
    """Write `<cfg.dest>/meta.csv` from `<cfg.src>/truth.csv` after a whole ingest run or a merge; returns its
    path, or None when there is no truth (and then no meta.csv). A shard writes nothing: `merge` does."""
    from headct.data.ingest import linkage_path

    dest = cfg.dest / META
    source = cfg.src / truth.TRUTH
    if cfg.shard or not source.is_file():
        if not cfg.shard:
            dest.unlink(missing_ok=True)  # describes an earlier store, not this one
        return None
    table = truth.read_truth(source)
    link = linkage_path(cfg, root)
    try:
        linkage = read_linkage(link)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{link}: cannot read the linkage file to place {source}'s truth ({err})") from err
    meta = meta_table(table, linkage, cfg.src, cfg.preprocess.spacing_mm)
    with atomic_path(dest) as tmp:
        meta.to_csv(tmp, index=False)
    return dest
