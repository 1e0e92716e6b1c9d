"""Job `headct predict STUDY`: one study -> per-finding probabilities and decisions, for a person at a terminal.

Recipe: load the fine-tuned classifier directory (strictly); ingest the study with the classifier's own
preprocessing through the same QC, series choice and resampling as `headct ingest` (`headct.study.load_study`,
a throw-away store and key); score the chosen series (or every passing one with keep=all); decide each finding
at the threshold chosen on validation when the classifier was trained, but only for the labels the validation gate
(`headct.eval.validation_gate`, settings predict.min_auroc_low / min_val_positives) calls validated; the others
show their probability and val AUROC [95% CI] and no decision (JSON `positive: null`). Prints the series used (one-off id,
kernel, slices, spacing), every series QC set aside with its reason, and the table of findings. Nothing is
written unless `predict.out` names a JSON file. Not a medical device: a research tool's output.
"""

from __future__ import annotations

from typing import Any

from headct.config.base import JobContext
from headct.config.finetune import PredictConfig
from headct.errors import InputError

SERIES_FACTS = ("scan_id", "source_format", "kernel", "kvp", "slice_thickness_mm", "n_slices", "tilt_deg", "manufacturer")


def run(cfg: PredictConfig, ctx: JobContext) -> dict[str, Any]:
    import json

    import numpy as np
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from headct.device import resolve_device
    from headct.eval.validation_gate import NO_RECORD, GateRule, finding, judge
    from headct.io import write_text
    from headct.models.classifier_dir import CONFIG, load_classifier, predict_proba
    from headct.study import load_study

    if cfg.study is None:
        raise InputError("no study given: `headct predict STUDY` (a DICOM folder or a NIfTI file)")
    device = resolve_device(cfg.device)
    classifier, config = load_classifier(cfg.classifier_dir, device)
    rule = GateRule(cfg.min_auroc_low, cfg.min_val_positives)
    verdicts = judge(config, rule, str(cfg.classifier_dir / CONFIG))
    study = load_study(cfg.study, config["preprocess"], keep=cfg.keep)
    probabilities = predict_proba(classifier, np.stack(study.volumes))
    labels, thresholds = list(config["labels"]), config["thresholds"]
    validated = [label for label in labels if verdicts[label].validated]
    series = [{k: row.get(k) for k in SERIES_FACTS if k in row} for row in study.series]
    results = [{"series": facts, "findings": {label: finding(p, thresholds[label], verdicts[label])
                                              for label, p in zip(labels, probs, strict=True)}}
               for facts, probs in zip(series, probabilities, strict=True)]
    # No source path, UID or name: the study is named by nothing but its one-off ids; the classifier by its weights.
    out = {"classifier": {"weights_sha256": config["weights_sha256"],
                          "run_id": (config.get("provenance") or {}).get("run_id")},
           "gate": {"min_auroc_low": rule.min_auroc_low, "min_val_positives": rule.min_val_positives,
                    "validated_labels": validated},
           "results": results,
           "set_aside": [{"series_id": r.get("series_id"), "reason": r["reason"], "message": r["message"]}
                         for r in study.rejected]}

    console = Console()
    if not validated:
        why = NO_RECORD if "performance" not in config else f"none meets {rule.text()}"
        console.print(f"[bold yellow]No finding of this classifier is validated[/] ({escape(why)}): "
                      "probabilities only, no decisions.", soft_wrap=True)
    for result in results:
        facts = result["series"]
        console.print("series used: " + ", ".join(f"{k} {v}" for k, v in facts.items() if v not in (None, "")))
        table = Table(title=f"findings (decisions only where validated: {rule.text()})")
        for name in ("finding", "probability", "threshold", "decision"):
            table.add_column(name, justify="left" if name == "finding" else "right")
        for label, f in result["findings"].items():
            if f["validated"]:
                table.add_row(label, f"{f['probability']:.3f}", f"{f['threshold']:.3f}",
                              "[bold red]positive[/]" if f["positive"] else "negative")
            else:  # no threshold shown: it would invite the decision validation did not earn
                table.add_row(label, f"{f['probability']:.3f}", "-", f"[dim]{escape(verdicts[label].status())}[/]")
        console.print(table)
    for r in out["set_aside"]:
        console.print(f"[yellow]QC set aside[/] {r['series_id']}: {r['reason']} ({r['message']})")
    if cfg.out is not None:
        # Strict JSON: a NaN or infinity is a bug to see, never a token other parsers reject.
        write_text(cfg.out, json.dumps(out, indent=2, sort_keys=True, allow_nan=False) + "\n")
        console.print(f"wrote {cfg.out}")
    return out
