"""The few numbers per stage that DVC shows: `reports/<stage>/headline.json`, the stage's declared DVC metric.

Each stage's `metrics.json` stays the full record (the report and other readers use it); `headline.json` is a small
summary of it, so `dvc metrics show` / `dvc metrics diff` and `dvc exp show` fit a terminal. Every stage has a
budget of values (`BUDGET`, at most 100 in all, checked by a test); `write_headline` refuses more, so a headline
can never grow back into thousands of columns. Where a stage has more arms than its budget holds (many
external encoders, random-init seeds or shot counts), the arms are taken in `_ordered` order (pre-trained first) and
`arms_not_shown` says how many were left out: nothing is dropped without a count.

Numbers only (ints, floats rounded to 4 decimals, or null where a value is undefined); the structure is nested
JSON, which DVC shows as dotted columns (`pretrained.ICH.auroc`). Imports only the standard library and headct.io.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from headct.io import write_json

FILENAME = "headline.json"
PRIMARY = "ICH"  # the label whose AUROC (with its 95% CI) every evaluation headline carries
MAX_VALUES = 100  # across all stages: what `dvc metrics show` can print on one terminal
# Values per stage; their sum is at most MAX_VALUES (tests/test_headline.py).
BUDGET = {"synth": 2, "ingest": 5, "split": 3, "pretrain": 4, "probe": 26, "fewshot": 26, "retrieval": 7,
          "compare": 4, "tune": 1, "finetune": 5, "ceiling": 5}
ARMS_NOT_SHOWN = "arms_not_shown"


class HeadlineError(ValueError):
    """A headline that breaks its stage's budget or holds something other than numbers (a programming error)."""


def count_values(tree: Mapping[str, Any]) -> int:
    """Leaf values of a nested mapping."""
    return sum(count_values(v) if isinstance(v, Mapping) else 1 for v in tree.values())


def _check(tree: Mapping[str, Any], where: str = "") -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _check(value, f"{where}{key}.")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise HeadlineError(f"headline value {where}{key} = {value!r}: only numbers (or null) belong in a headline")


def write_headline(report_dir: Path, stage: str, values: Mapping[str, Any]) -> Path:
    """Write `values` to `<report_dir>/headline.json` (atomic); refuse more values than the stage's budget."""
    if stage not in BUDGET:
        raise HeadlineError(f"no headline budget for stage {stage!r}; stages: {', '.join(BUDGET)}")
    _check(values)
    n = count_values(values)
    if n > BUDGET[stage]:
        raise HeadlineError(f"{stage} headline has {n} values, its budget is {BUDGET[stage]} "
                            f"({MAX_VALUES} across all stages, so `dvc metrics show` fits a terminal)")
    path = Path(report_dir) / FILENAME
    write_json(path, values)
    return path


def _num(value: Any, digits: int = 4) -> float | int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, digits)


def _ordered(models: list[str]) -> list[str]:
    """Pre-trained first, then random init (its seeds in order), the HU histogram, then the rest as given."""
    def rank(name: str) -> tuple[int, int]:
        for i, prefix in enumerate(("pretrained", "random_init", "hu_histogram")):
            if name == prefix or name.startswith(prefix + "_"):
                return i, models.index(name)
        return 3, models.index(name)

    return sorted(models, key=rank)


def _per_arm(models: list[str], budget: int, entry: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """{arm: entry(arm)} for as many arms (in `_ordered` order) as fit in `budget`, plus `arms_not_shown` when
    some did not (one value of the budget is kept for that count)."""
    entries = [(m, entry(m)) for m in _ordered(models)]
    if sum(count_values(e) for _, e in entries) <= budget:
        return dict(entries)
    out: dict[str, Any] = {}
    used = 1  # the count below
    for name, e in entries:
        if used + count_values(e) > budget:
            break
        out[name] = e
        used += count_values(e)
    out[ARMS_NOT_SHOWN] = len(entries) - (len(out))
    return out


def _auroc_entry(by_label: Mapping[str, Any]) -> dict[str, Any]:
    """Mean test AUROC over the evaluated labels, and the primary label's AUROC with its 95% CI (when evaluated)."""
    aurocs = [r["auroc"] for r in by_label.values() if isinstance(r, Mapping) and r.get("auroc") is not None]
    out: dict[str, Any] = {"mean_auroc": _num(sum(aurocs) / len(aurocs)) if aurocs else None}
    primary = by_label.get(PRIMARY)
    if isinstance(primary, Mapping) and primary.get("auroc") is not None:
        out[PRIMARY] = {"auroc": _num(primary["auroc"]), "low": _num(primary.get("auroc_low")),
                        "high": _num(primary.get("auroc_high"))}
    return out


def synth_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"studies": metrics.get("n_studies"), "series": metrics.get("n_series")}


def ingest_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Counts: studies and series seen, scans accepted, series rejected (any reason), duplicates."""
    rejected = summary.get("rejected") or {}
    return {"studies_seen": summary.get("studies_seen"), "series_seen": summary.get("series_seen"),
            "accepted": summary.get("accepted"),
            "rejected": sum(rejected.values()) if isinstance(rejected, Mapping) else rejected,
            "duplicates": summary.get("duplicates")}


def split_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Patients per split."""
    return {name: (metrics.get(name) or {}).get("patients") for name in ("train", "val", "test")}


def pretrain_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"heldout_loss_start": _num(metrics.get("heldout_loss_start"), 6),
            "heldout_loss_end": _num(metrics.get("heldout_loss_end"), 6),
            "volumes_per_s": _num(metrics.get("volumes_per_s"), 2), "samples": metrics.get("samples")}


def probe_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: mean test AUROC over the probed labels, ICH's AUROC [95% CI]."""
    models = [m for m, v in metrics.items() if isinstance(v, Mapping) and m not in ("skipped", "selection",
                                                                                    "diagnostic")]
    return _per_arm(models, BUDGET["probe"], lambda m: _auroc_entry(metrics[m]))


def fewshot_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: the mean over labels of the test AUROC (itself the mean over seeds) at each K."""
    mean = metrics.get("mean_over_labels") or {}
    return _per_arm(list(mean), BUDGET["fewshot"],
                    lambda m: {f"K{k}": _num(e.get("auroc_mean")) for k, e in mean[m].items()})


def retrieval_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: mAP averaged over the queried labels."""
    models = [m for m, v in metrics.items() if isinstance(v, Mapping) and m not in ("skipped", "split")]

    def entry(m: str) -> dict[str, Any]:
        maps = [r["map"] for r in metrics[m].values() if isinstance(r, Mapping) and r.get("map") is not None]
        return {"mean_map": _num(sum(maps) / len(maps)) if maps else None}

    return _per_arm(models, BUDGET["retrieval"], entry)


def compare_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """On the probe's predictions: does the model beat the best random init and the baseline on the primary label
    (1/0), the share of the gap it closes, and how many secondary labels beat random init."""
    summary = (metrics.get("summary") or {}).get("probe") or {}

    def flag(value: Any) -> int | None:
        return None if value is None else int(bool(value))

    return {"primary_beats_random": flag(summary.get("primary_beats_random")),
            "primary_beats_baseline": flag(summary.get("primary_beats_baseline")),
            "primary_gap_closure": _num(summary.get("primary_gap_closure")),
            "labels_beating_random": len(summary.get("labels_beating_random") or [])}


def tune_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"best_val_auroc_mean": _num(metrics.get("best_val_auroc_mean"))}


def finetune_headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Mean test AUROC over the fine-tuned labels, ICH's AUROC [95% CI], the best epoch's mean val AUROC."""
    entry = _auroc_entry(metrics.get("labels") or {})
    return {**entry, "best_val_auroc_mean": _num(metrics.get("best_val_auroc_mean"))}


HEADLINES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "synth": synth_headline, "ingest": ingest_headline, "split": split_headline, "pretrain": pretrain_headline,
    "probe": probe_headline, "fewshot": fewshot_headline, "retrieval": retrieval_headline,
    "compare": compare_headline, "tune": tune_headline, "finetune": finetune_headline,
    "ceiling": finetune_headline,  # the fine-tuning job run with the `ceiling` section
}


def write_stage_headline(report_dir: Path, stage: str, metrics: Mapping[str, Any]) -> Path:
    """The stage's headline of its metrics.json content -> `<report_dir>/headline.json`."""
    return write_headline(report_dir, stage, HEADLINES[stage](metrics))
