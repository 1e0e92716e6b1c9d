"""Job `headct report`: the closing results table from the pre-training and probe metrics.

Inputs: cfg.pretrain_metrics (method; heldout_loss_start, heldout_loss_end: the pretext loss on held-out val
volumes, masked-patch MSE for MAE, self-distillation cross-entropy for DINO) and
cfg.probe_metrics ({"pretrained": {label: {...}}, "random_init": {...}, "skipped": {label: reason}}).
Outputs under cfg.report_dir: results.md and metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headct.config import LABELS, JobContext, ReportConfig
from headct.errors import InputError


def _load(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    missing = [key for key in required if key not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}")
    return data


def _auroc_cell(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    if m.get("auroc_low") is None:
        return f"{m['auroc']:.3f}"
    return f"{m['auroc']:.3f} [{m['auroc_low']:.3f}, {m['auroc_high']:.3f}]"


def _canonical(labels: Any) -> list[str]:
    """Labels in vocabulary order (metrics JSON keys come sorted alphabetically); unknown names last."""
    order = {label: i for i, label in enumerate(LABELS)}
    return sorted(labels, key=lambda label: (order.get(label, len(order)), label))


def results_rows(probe: dict[str, Any]) -> list[list[str]]:
    """[label, test positives, AUROC [CI] pre-trained, AUROC [CI] random init] per probed label."""
    rows = []
    for label in _canonical(probe["pretrained"]):
        m = probe["pretrained"][label]
        rows.append([label, str(m["n_pos"]), _auroc_cell(m), _auroc_cell(probe["random_init"].get(label))])
    return rows


HEADER = ["label", "test positives", "AUROC [95% CI] pre-trained", "AUROC [95% CI] random init"]


def render_markdown(pretrain: dict[str, Any], probe: dict[str, Any]) -> str:
    lines = [
        "# Results",
        "",
        "Linear probe on frozen features, test split; 95% CIs from a patient-level bootstrap.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in results_rows(probe)]
    if probe.get("skipped"):
        lines += ["", "Skipped labels:", ""]
        lines += [f"- {label}: {probe['skipped'][label]}" for label in _canonical(probe["skipped"])]
    lines += [
        "",
        f"Held-out pretext loss ({pretrain.get('method', 'mae').upper()} pre-training): "
        f"{pretrain['heldout_loss_start']:.4f} at start, "
        f"{pretrain['heldout_loss_end']:.4f} at end.",
        "",
    ]
    return "\n".join(lines)


def summary_metrics(pretrain: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "heldout_loss_start": pretrain["heldout_loss_start"],
        "heldout_loss_end": pretrain["heldout_loss_end"],
        "labels_probed": len(probe["pretrained"]),
        "labels_skipped": len(probe.get("skipped", {})),
    }
    for model in ("pretrained", "random_init"):
        values = [m["auroc"] for m in probe[model].values()]
        out[f"mean_auroc_{model}"] = sum(values) / len(values) if values else None
    return out


def run(cfg: ReportConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.io import write_json, write_text

    pretrain = _load(cfg.pretrain_metrics, ("heldout_loss_start", "heldout_loss_end"))
    probe = _load(cfg.probe_metrics, ("pretrained", "random_init"))
    markdown = render_markdown(pretrain, probe)
    summary = summary_metrics(pretrain, probe)
    write_text(cfg.report_dir / "results.md", markdown)
    write_json(cfg.report_dir / "metrics.json", summary)

    with tracking.job_run(ctx.tracking, "report", cfg, ctx.root) as mlrun:
        mlrun.log_metrics({k: v for k, v in summary.items() if v is not None})
        mlrun.log_artifact(cfg.report_dir / "results.md", "report")

    table = Table(title="results: linear probe, test AUROC [95% CI]")
    for name in HEADER:
        table.add_column(name, justify="left" if name == "label" else "right")
    for row in results_rows(probe):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for label in _canonical(probe.get("skipped", {})):
        console.print(f"skipped {label}: {probe['skipped'][label]}")
    console.print(
        f"held-out pretext loss: {summary['heldout_loss_start']:.4f} -> {summary['heldout_loss_end']:.4f}"
    )
    return summary
