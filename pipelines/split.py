"""Job `headct split`: canonical store -> patient-disjoint, stratified, seeded train/val/test split files.

Outputs: `<cfg.out>/{train,val,test}.csv`, `<cfg.out>/split.json`, `<cfg.report_dir>/metrics.json`; with
`split.labelled_train`, also `<cfg.out>/pool.csv` (the train patients whose labels the evaluations never read:
the pre-training pool).
"""

from __future__ import annotations

from typing import Any

from headct.config.base import JobContext
from headct.config.data import SplitConfig


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    counts = summary["counts"]
    table = Table(title=f"split (seed {summary['seed']}): patients / scans / positive scans per label")
    table.add_column("", style="bold")
    for name in counts:
        table.add_column(name, justify="right")
    table.add_row("patients", *(str(c["patients"]) for c in counts.values()))
    table.add_row("scans", *(str(c["scans"]) for c in counts.values()))
    for label in summary["labels"]:
        table.add_row(label, *(str(c["positives"][label]) for c in counts.values()))
    Console().print(table)


def run(cfg: SplitConfig, ctx: JobContext) -> dict[str, Any]:
    from headct import tracking
    from headct.data.splits import load_store_table, make_split, write_split
    from headct.headline import write_stage_headline
    from headct.io import write_json

    table = load_store_table(cfg.store)
    split = make_split(table, cfg.fractions, cfg.seed, cfg.counts, cfg.labelled_train)
    summary = write_split(split, cfg.out, cfg.store, ctx.root, cfg.seed, cfg.fractions, cfg.counts,
                          cfg.labelled_train)
    # DVC metrics: the same counts, so `dvc metrics diff` shows how a new seed or store moved them.
    metrics_path = cfg.report_dir / "metrics.json"
    write_json(metrics_path, {"seed": cfg.seed, **summary["counts"]})
    write_stage_headline(cfg.report_dir, "split", summary["counts"])  # the DVC metric: a few numbers of it

    with tracking.job_run(ctx.tracking, "split", cfg, ctx.root) as mlrun:
        flat = {}
        for name, c in summary["counts"].items():
            flat[f"{name}.patients"] = c["patients"]
            flat[f"{name}.scans"] = c["scans"]
            flat.update({f"{name}.pos.{lab}": n for lab, n in c["positives"].items()})
        mlrun.log_metrics(flat)
        mlrun.log_artifact(cfg.out / "split.json", "split")
    _print_table(summary)
    return {name: {"patients": c["patients"], "scans": c["scans"]} for name, c in summary["counts"].items()}
