"""The validation gate: a classifier presents a decision for a label only where validation earned it.

A threshold is always *chosen* on val (Youden's J), even for a label whose val AUROC is at chance; a decision at
such a threshold is no better than a coin. So `headct finetune` records, per label, what validation measured
(`performance_record`, written into the classifier directory's config.json under `performance`), and every
consumer (`headct predict`, `headct.load_classifier(...).decisions()`, the MLflow model version's description)
asks `judge` which labels are *validated*:

    validated  <=>  the val AUROC's patient-bootstrap 95% CI lower bound > `min_auroc_low` (default 0.7)
                    and the val set held >= `min_val_positives` positive scans (default 20).

The rule is applied when the classifier is used (its two numbers are `predict` settings), not baked into
config.json: the record holds the measurements only. A config.json from before this record (no `performance`)
loads, and none of its labels is validated. Figures come from `headct.eval.metrics.evaluate_binary` (the one
patient bootstrap); the val sensitivity/specificity are at the threshold chosen on that same val set, so they are
optimistic. Test figures, when the job scored test, are stored beside them under "test", never used by the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from headct.config.finetune import PredictConfig
from headct.errors import InputError

# The defaults are `headct predict`'s settings (predict.min_auroc_low, predict.min_val_positives).
DEFAULT_MIN_AUROC_LOW: float = PredictConfig.model_fields["min_auroc_low"].default
DEFAULT_MIN_VAL_POSITIVES: int = PredictConfig.model_fields["min_val_positives"].default
PERFORMANCE = "performance"  # the config.json key of the record
# What is kept of evaluate_binary's output per split: AUROC and the operating point, with their 95% CIs, and counts.
FIGURES = ("auroc", "auroc_low", "auroc_high", "threshold", "sensitivity", "sensitivity_low", "sensitivity_high",
           "specificity", "specificity_low", "specificity_high", "n_pos", "n_neg", "n_patients", "bootstrap_valid")
NO_RECORD = ("its config.json has no validation record (a `headct finetune` from before records were kept); re-run "
             "`headct finetune` to validate it")


class UnvalidatedLabelError(ValueError):
    """A decision was asked for a label validation did not earn, without the explicit override."""


def _number(value: Any) -> float | int | None:
    """JSON-safe: NaN/inf (and None) -> None, so config.json and predict's JSON stay strict JSON."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def operating_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The FIGURES of one label's `evaluate_binary` output (JSON-safe)."""
    return {key: _number(metrics.get(key)) for key in FIGURES}


def performance_record(val: dict[str, dict[str, Any]], test: dict[str, dict[str, Any]] | None,
                       bootstrap: int) -> dict[str, Any]:
    """config.json's `performance` block from per-label `evaluate_binary` outputs on val (and on test, if scored):
    {"ci": ..., "bootstrap": n, "labels": {label: {"val": FIGURES, "test": FIGURES (only when scored)}}}."""
    labels: dict[str, Any] = {label: {"val": operating_figures(m)} for label, m in val.items()}
    for label, m in (test or {}).items():
        if label in labels:
            labels[label]["test"] = operating_figures(m)
    return {"ci": "95% percentile interval, patient bootstrap", "bootstrap": int(bootstrap),
            "threshold_rule": "Youden's J on val (val sensitivity/specificity are therefore optimistic)",
            "test_note": "test figures (key `test`) were measured once after the threshold was fixed; the gate "
                         "reads val only",
            "labels": labels}


@dataclass(frozen=True)
class GateRule:
    min_auroc_low: float = DEFAULT_MIN_AUROC_LOW
    min_val_positives: int = DEFAULT_MIN_VAL_POSITIVES

    def text(self) -> str:
        return f"val AUROC 95% CI lower bound > {self.min_auroc_low:g} with >= {self.min_val_positives} val positives"


@dataclass(frozen=True)
class Verdict:
    """Whether one label is validated, why, and the val figures it was judged on (None: none recorded)."""

    label: str
    validated: bool
    reason: str  # why not validated ("" when validated)
    val: dict[str, Any] | None
    test: dict[str, Any] | None = None
    note: str = ""  # a failed condition other than the interval, shown beside the AUROC (e.g. too few positives)

    def auroc_text(self) -> str:
        """'val AUROC 0.523 [0.310, 0.702]' ('no val figures recorded' without a record)."""
        if self.val is None or self.val.get("auroc") is None:
            return "no val figures recorded"
        low, high = self.val.get("auroc_low"), self.val.get("auroc_high")
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else " [no CI]"
        return f"val AUROC {self.val['auroc']:.3f}{ci}"

    def status(self) -> str:
        """What a person sees instead of a decision: 'not validated (val AUROC x [lo, hi])'."""
        note = f"; {self.note}" if self.note else ""
        return "validated" if self.validated else f"not validated ({self.auroc_text()}{note})"


def judge(config: dict[str, Any], rule: GateRule, source: str = "config.json") -> dict[str, Verdict]:
    """label -> Verdict for every label of a classifier config (`source` names the file in errors)."""
    labels = list(config["labels"])
    record = config.get(PERFORMANCE)
    if record is None:
        return {label: Verdict(label, False, NO_RECORD, None) for label in labels}
    if not isinstance(record, dict) or not isinstance(record.get("labels"), dict):
        raise InputError(f"{source}: `{PERFORMANCE}` must be an object with a `labels` object")
    out = {}
    for label in labels:
        entry = record["labels"].get(label)
        val = entry.get("val") if isinstance(entry, dict) else None
        test = entry.get("test") if isinstance(entry, dict) else None
        if not isinstance(val, dict):
            out[label] = Verdict(label, False, "no val figures recorded for this label", None, test)
            continue
        low, n_pos = val.get("auroc_low"), val.get("n_pos")
        note = ""
        if low is None:
            reason = "val AUROC has no confidence interval (too few usable bootstrap resamples)"
        elif not low > rule.min_auroc_low:
            reason = f"val AUROC CI lower bound {low:.3f} is not above {rule.min_auroc_low:g}"
        elif n_pos is None or n_pos < rule.min_val_positives:
            reason = note = f"{n_pos} val positives, fewer than {rule.min_val_positives}"
        else:
            reason = ""
        out[label] = Verdict(label, not reason, reason, val, test, note)
    return out


def finding(probability: float, threshold: float, verdict: Verdict) -> dict[str, Any]:
    """One finding of `headct predict`'s JSON: a decision (`positive`) only when the label is validated, else null."""
    p, t = float(probability), _number(threshold)
    out = {"probability": round(p, 4), "threshold": None if t is None else round(t, 4),
           "validated": verdict.validated, "positive": p >= t if verdict.validated and t is not None else None,
           "validation": verdict.val}
    if not verdict.validated:
        out["not_validated_because"] = verdict.reason
    return out


def describe(verdicts: dict[str, Verdict], rule: GateRule) -> str:
    """Plain-text summary for a model registry description: which labels may decide, and each label's val AUROC."""
    good = [v for v in verdicts.values() if v.validated]
    bad = [v for v in verdicts.values() if not v.validated]
    lines = [f"Validation gate ({rule.text()})."]
    if not good:
        lines.append("NO LABEL IS VALIDATED: this classifier's probabilities carry no decision.")
    for title, group in (("Validated (decisions allowed)", good), ("Not validated (probabilities only)", bad)):
        if group:
            lines.append(f"{title}: " + "; ".join(
                f"{v.label} ({v.auroc_text()}, {_counts(v)}{'' if v.validated else ', ' + v.reason})" for v in group))
    return "\n".join(lines)


def _counts(verdict: Verdict) -> str:
    if verdict.val is None:
        return "no val counts"
    return f"{verdict.val.get('n_pos')} val positives / {verdict.val.get('n_neg')} negatives"
