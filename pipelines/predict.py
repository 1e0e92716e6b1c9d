"""Job `headct predict STUDY`: one study -> per-finding probabilities and decisions, for a person at a terminal.

Recipe: load the fine-tuned classifier directory (strictly); ingest the study with the classifier's own
preprocessing through the same QC, series choice and resampling as `headct ingest` (`headct.study.load_study`,
a throw-away store and key); score the chosen series (or every passing one with keep=all); decide each finding
at the threshold chosen on validation when the classifier was trained. Prints the series used (one-off id,
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
    from rich.console import Console
    from rich.table import Table

    from headct.device import resolve_device
    from headct.io import write_json
    from headct.models.classifier_dir import load_classifier, predict_proba
    from headct.study import load_study

    if cfg.study is None:
        raise InputError("no study given: `headct predict STUDY` (a DICOM folder or a NIfTI file)")
    device = resolve_device(cfg.device)
    classifier, config = load_classifier(cfg.classifier_dir, device)
    study = load_study(cfg.study, config["preprocess"], keep=cfg.keep)
    import numpy as np

    probabilities = predict_proba(classifier, np.stack(study.volumes))
    labels, thresholds = list(config["labels"]), config["thresholds"]
    series = [{k: row.get(k) for k in SERIES_FACTS if k in row} for row in study.series]
    results = []
    for facts, probs in zip(series, probabilities, strict=True):
        findings = {label: {"probability": round(float(p), 4), "threshold": round(float(thresholds[label]), 4),
                            "positive": bool(p >= thresholds[label])} for label, p in zip(labels, probs, strict=True)}
        results.append({"series": facts, "findings": findings})
    out = {"study": str(cfg.study), "classifier": str(cfg.classifier_dir), "results": results,
           "set_aside": [{"series_id": r.get("series_id"), "reason": r["reason"], "message": r["message"]}
                         for r in study.rejected]}

    console = Console()
    for result in results:
        facts = result["series"]
        console.print("series used: " + ", ".join(f"{k} {v}" for k, v in facts.items() if v not in (None, "")))
        table = Table(title="findings (threshold chosen on validation)")
        for name in ("finding", "probability", "threshold", "decision"):
            table.add_column(name, justify="left" if name == "finding" else "right")
        for label, f in result["findings"].items():
            table.add_row(label, f"{f['probability']:.3f}", f"{f['threshold']:.3f}",
                          "[bold red]positive[/]" if f["positive"] else "negative")
        console.print(table)
    for r in out["set_aside"]:
        console.print(f"[yellow]QC set aside[/] {r['series_id']}: {r['reason']} ({r['message']})")
    if cfg.out is not None:
        write_json(cfg.out, out)
        console.print(f"wrote {cfg.out}")
    return out
