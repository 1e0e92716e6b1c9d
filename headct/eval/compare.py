"""Does pre-training help? Comparisons of models on the same test predictions, as pure functions over the
predictions CSV contract (columns scan_id, patient_id, split, label, model, mode, k, seed, score, target).

Method (one label, one setting: the linear probe, or few-shot at one K):
- Pairing. Every model is scored on the same test scans; in few-shot, on the same scans for each seed, and seed s
  of one model was trained on the same K-shot draw as seed s of the other (headct/eval/fewshot.py draws by
  (seed, label) only). A model's AUROC is the mean over seeds of its AUROC on the test scans (one seed: the probe).
- Uncertainty: a two-level bootstrap. Each replicate draws test *patients* with replacement (a patient's scans move
  together, as in headct/eval/metrics.py: scans of one patient are not independent, and duplicating a patient's
  rows changes nothing) AND, in few-shot, seeds with replacement (the K-shot draw is the other source of
  variation: a result that holds for one lucky draw must not look certain). A replicate's AUROC of a model is the
  mean over the drawn seeds of its weighted AUROC on the drawn patients; the same patients and seeds are used for
  every model, so differences are paired. 95% intervals are the 2.5 and 97.5 percentiles. With one seed the
  patient draws are exactly those of `metrics.patient_bootstrap` for the same seed and resample count, so a
  model's interval here equals the probe's own.
- "Beats the best random init, non-overlapping CIs": the best random-init arm is the one with the highest test
  AUROC (the conservative choice: the comparison is against the luckiest init), and model A beats it when A's
  lower bound is above that arm's upper bound.
- Paired difference (A vs a baseline): the interval of AUROC_A - AUROC_B over the same replicates; "above zero"
  when its lower bound is > 0.
- Gap closure: (AUROC_A - AUROC_random_best) / (AUROC_ceiling - AUROC_random_best), undefined (None) when the
  ceiling is not above the best random init.
- Severity strata: a stratum's AUROC is its positives against ALL negatives (`stratum_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from headct.eval.metrics import UsableDraws, auroc, percentile_interval, weighted_auroc


@dataclass
class Paired:
    """Several models' test scores on the same scans: y (n,) 0/1, groups (n,) patient ids, scores model ->
    (S, n) (one row per seed, seeds sorted), seeds (S,)."""

    y: np.ndarray
    groups: np.ndarray
    scores: dict[str, np.ndarray]
    seeds: list[int]


def _seed_key(values: pd.Series) -> pd.Series:
    """The seed column as int (empty = -1: a prediction without seeds is one seed)."""
    return pd.to_numeric(values, errors="raise").fillna(-1).astype(np.int64)


def paired_scores(rows: pd.DataFrame, models: Sequence[str]) -> Paired:
    """Align `models`' rows (one label and setting; test split) by seed and scan.

    ValueError naming the model when a model is missing, a (seed, scan) appears twice, or the models were not
    scored on the same seeds and scans, or a scan's target differs between rows.
    """
    rows = rows.assign(_seed=_seed_key(rows["seed"]))
    ref = None
    scores: dict[str, np.ndarray] = {}
    for model in models:
        part = rows[rows["model"] == model]
        if part.empty:
            raise ValueError(f"model {model!r} has no predictions here")
        if part.duplicated(["_seed", "scan_id"]).any():
            raise ValueError(f"model {model!r}: a scan appears twice for one seed")
        score = part.pivot(index="scan_id", columns="_seed", values="score").sort_index().sort_index(axis=1)
        target = part.pivot(index="scan_id", columns="_seed", values="target").reindex_like(score)
        if ref is None:
            ref = (score.index, score.columns, target)
            if score.isna().any().any():
                raise ValueError(f"model {model!r}: seeds were scored on different scans")
        elif not (score.index.equals(ref[0]) and score.columns.equals(ref[1])) or score.isna().any().any():
            raise ValueError(f"models {models[0]!r} and {model!r} were not scored on the same seeds and scans")
        if not target.equals(ref[2]) or (target.nunique(axis=1) > 1).any():
            raise ValueError(f"model {model!r}: the targets of a scan differ between rows")
        scores[model] = score.to_numpy(dtype=np.float64).T
    assert ref is not None
    patients = rows.drop_duplicates("scan_id").set_index("scan_id")["patient_id"]
    y = ref[2].iloc[:, 0].to_numpy()
    if not np.isin(y, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    return Paired(y.astype(np.int8), patients.reindex(ref[0]).to_numpy(str), scores, [int(s) for s in ref[1]])


@dataclass
class BootstrapAurocs:
    """Point AUROC (mean over seeds, all test patients) and bootstrap replicates per model."""

    point: dict[str, float]
    samples: dict[str, np.ndarray] = field(repr=False)
    n_valid: int = 0
    n_redrawn: int = 0
    n_seeds: int = 1


def bootstrap_aurocs(
    paired: Paired, n_resamples: int = 1000, seed: int = 0, max_draw_factor: int = 10
) -> BootstrapAurocs:
    """The two-level (patients, then seeds) bootstrap of every model's AUROC (module docstring). A resample
    without positives or negatives is drawn again, up to `max_draw_factor * n_resamples` draws in all."""
    y, n_seeds = paired.y, len(paired.seeds)
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("AUROC needs positives and negatives")
    point = {m: float(np.mean([auroc(y, s) for s in scores])) for m, scores in paired.scores.items()}
    rng = np.random.default_rng(seed)
    draws = UsableDraws(y, paired.groups, n_resamples, rng, max_draw_factor)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in paired.scores}
    for w in draws:
        # With one seed nothing is drawn, so the patient draws match metrics.patient_bootstrap's.
        drawn = rng.integers(0, n_seeds, size=(len(w), n_seeds)) if n_seeds > 1 else np.zeros((len(w), 1), int)
        for model, scores in paired.scores.items():
            per_seed = np.stack([weighted_auroc(y, s, w) for s in scores], axis=1)  # (R, S)
            parts[model].append(np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1))
    samples = {m: np.concatenate(p) if p else np.zeros(0) for m, p in parts.items()}
    return BootstrapAurocs(point, samples, draws.n_valid, draws.n_redrawn, n_seeds)


def model_auroc(boot: BootstrapAurocs, model: str) -> dict[str, Any]:
    low, high = percentile_interval(boot.samples[model])
    return {"auroc": boot.point[model], "low": low, "high": high}


def paired_difference(boot: BootstrapAurocs, a: str, b: str) -> dict[str, Any]:
    """AUROC_a - AUROC_b with its paired 95% interval; `above_zero` when the lower bound is > 0."""
    low, high = percentile_interval(boot.samples[a] - boot.samples[b])
    return {"diff": boot.point[a] - boot.point[b], "low": low, "high": high,
            "above_zero": low is not None and low > 0}


def versus_best(boot: BootstrapAurocs, model: str, others: Sequence[str]) -> dict[str, Any]:
    """`model` against the best of `others` (highest test AUROC): its interval, the best one's, and whether
    `model`'s lower bound is above the best one's upper bound (`beats`); `non_overlapping` either way."""
    if not others:
        raise ValueError("no model to compare with")
    best = max(others, key=lambda m: (boot.point[m], -list(others).index(m)))  # ties: the first listed
    a, b = model_auroc(boot, model), model_auroc(boot, best)
    known = a["low"] is not None and b["low"] is not None
    beats = known and a["low"] > b["high"]
    below = known and b["low"] > a["high"]
    return {"best": best, "model": a, "best_auroc": b, "beats": bool(beats), "non_overlapping": bool(beats or below),
            "others": {m: boot.point[m] for m in others}}


def gap_closure(auc_model: float, auc_random_best: float, auc_ceiling: float) -> float | None:
    """Share of the gap between the best random init and the ceiling that `auc_model` closes (1 = reaches the
    ceiling, 0 = no better than random init, < 0 = worse); None when the ceiling is not above random init."""
    gap = auc_ceiling - auc_random_best
    return None if gap <= 0 else (auc_model - auc_random_best) / gap


def strata_of(rows: pd.DataFrame, meta: pd.DataFrame, column: str) -> pd.Series:
    """Each row's stratum from a table keyed by `scan_id` (preferred) or `patient_id`: a Series aligned with
    `rows` (missing/empty = no stratum). KeyError naming what is missing."""
    if column not in meta.columns:
        raise KeyError(f"no column {column!r}")
    key = "scan_id" if "scan_id" in meta.columns else "patient_id" if "patient_id" in meta.columns else None
    if key is None:
        raise KeyError("no scan_id or patient_id column")
    values = meta.drop_duplicates(key).set_index(key)[column]
    strata = [None if pd.isna(v) or not str(v).strip() else str(v).strip() for v in rows[key].map(values)]
    return pd.Series(strata, index=rows.index, dtype=object)


def stratum_rows(rows: pd.DataFrame, strata: pd.Series, stratum: str) -> pd.DataFrame:
    """The rows of one stratum: its positives and ALL negatives (whatever their stratum)."""
    return rows[(rows["target"] == 0) | ((rows["target"] == 1) & (strata == stratum))]


def stratum_order(values: Sequence[str]) -> list[str]:
    """Strata by their first number ("<5" < "5-30" < ">30"), "<x" before "x", others alphabetical after."""
    import re

    def key(value: str) -> tuple:
        match = re.search(r"\d+(?:\.\d+)?", value)
        if match is None:
            return (1, 0.0, 0, value)
        return (0, float(match.group()), -1 if value.strip().startswith("<") else 1, value)

    return sorted(set(values), key=key)


def compare_rows(
    rows: pd.DataFrame,
    model: str,
    random_init: Sequence[str],
    baseline: str | None,
    ceiling_auc: float | None,
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Every comparison on one label's test rows of one setting (and stratum): `model` vs the best of
    `random_init` (non-overlapping CIs, and the paired difference), `model` vs `baseline` (paired difference),
    gap closure when `ceiling_auc` is given. Models absent from `rows` are left out; a comparison that cannot be
    made says why ({"skipped": reason})."""
    present = set(rows["model"])
    if model not in present:
        return {"skipped": f"no predictions of {model!r}"}
    randoms = [m for m in random_init if m in present]
    others = [*randoms, *([baseline] if baseline in present else [])]
    paired = paired_scores(rows, [model, *others])
    if not (paired.y == 1).any() or not (paired.y == 0).any():
        return {"skipped": f"{int(paired.y.sum())} positive and {int((paired.y == 0).sum())} negative scans"}
    boot = bootstrap_aurocs(paired, n_resamples, seed)
    out: dict[str, Any] = {
        "n_pos": int(paired.y.sum()), "n_neg": int((paired.y == 0).sum()),
        "n_patients": int(len(np.unique(paired.groups))), "n_seeds": boot.n_seeds,
        "bootstrap_valid": boot.n_valid, "bootstrap_redrawn": boot.n_redrawn,
        "aurocs": {m: model_auroc(boot, m) for m in [model, *others]},
    }
    if randoms:
        out["vs_random"] = versus_best(boot, model, randoms)
        out["vs_random"]["paired"] = paired_difference(boot, model, out["vs_random"]["best"])
        if ceiling_auc is not None:
            best = boot.point[out["vs_random"]["best"]]
            out["gap_closure"] = {"ceiling_auroc": ceiling_auc, "value": gap_closure(boot.point[model], best,
                                                                                     ceiling_auc)}
    else:
        out["vs_random"] = {"skipped": "no random-init predictions"}
    if baseline is not None:
        out["vs_baseline"] = ({"baseline": baseline, **paired_difference(boot, model, baseline)}
                              if baseline in present else {"skipped": f"no predictions of {baseline!r}"})
    return out


def mean_auroc(rows: pd.DataFrame) -> float | None:
    """One model's AUROC on its test rows, averaged over seeds (None without positives and negatives)."""
    values = []
    for _, part in rows.groupby(_seed_key(rows["seed"]), sort=True):
        y = part["target"].to_numpy()
        if (y == 1).any() and (y == 0).any():
            values.append(auroc(y, part["score"].to_numpy()))
    return float(np.mean(values)) if values else None


def ceiling_from_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """label -> test AUROC from a metrics.json: {"labels": {label: {"auroc": x}}} (`headct finetune`) or
    {label: {"auroc": x}}. ValueError when neither shape."""
    table = data.get("labels", data)
    out = {label: float(v["auroc"]) for label, v in table.items() if isinstance(v, Mapping) and "auroc" in v}
    if not out:
        raise ValueError('no per-label AUROC: expected {"labels": {label: {"auroc": x}}} or {label: {"auroc": x}}')
    return out
