"""Job `headct synth`: generate the synthetic head-CT data set (DICOM series + CQ500-style reads.csv).

Outputs: `<cfg.out>/` (study folders, reads.csv, truth.csv; replaced as a whole on every run, so no stale
study survives), `<cfg.montage>` (PNG) and `metrics.json` beside it (counts per label, size in bytes).
"""

from __future__ import annotations

import time
from typing import Any

from headct.config.base import LABELS, JobContext
from headct.config.data import SynthConfig


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"synth: {summary['n_studies']} studies, {summary['n_series']} series, "
                        f"{summary['bytes'] / 1e9:.2f} GB in {summary['seconds']:.0f} s")
    table.add_column("label", style="bold")
    table.add_column("studies", justify="right")
    table.add_column("prevalence", justify="right")
    for label in LABELS:
        table.add_row(label, str(summary["positives"][label]), f"{summary['prevalence'][label]:.1%}")
    Console().print(table)


def run(cfg: SynthConfig, ctx: JobContext) -> dict[str, Any]:
    from headct import tracking
    from headct.data.synth.dataset import generate, replacing
    from headct.data.synth.montage import write_montage
    from headct.data.synth.plan import plan_studies
    from headct.headline import write_stage_headline
    from headct.io import write_json

    start = time.perf_counter()
    report_dir = cfg.montage.parent
    with tracking.job_run(ctx.tracking, "synth", cfg, ctx.root) as mlrun:
        plans = plan_studies(cfg)
        with replacing(cfg.out) as staging:
            results = generate(cfg, staging, plans)
        shown = write_montage(cfg.out, plans, results, cfg.montage)
        n = len(plans)
        positives = {label: sum(p.labels[label] for p in plans) for label in LABELS}
        summary: dict[str, Any] = {
            "n_studies": n,
            "n_series": sum(r.n_series for r in results),
            "n_files": sum(r.n_files for r in results),
            "bytes": sum(r.bytes for r in results),
            "positives": positives,
            "prevalence": {label: positives[label] / n for label in LABELS},
            "reader_flips": sum(len(p.flips) for p in plans),
            "montage_studies": [plans[i].name for i in shown],
        }
        write_json(report_dir / "metrics.json", summary)  # no timing in it: DVC compares it across runs
        write_stage_headline(report_dir, "synth", summary)  # the DVC metric: a few numbers of it
        summary["seconds"] = round(time.perf_counter() - start, 1)
        mlrun.log_metrics({"n_studies": n, "n_series": summary["n_series"], "bytes": summary["bytes"],
                           **{f"prevalence/{label}": v for label, v in summary["prevalence"].items()}})
        mlrun.log_artifact(cfg.montage, "synth")
        mlrun.log_artifact(report_dir / "metrics.json", "synth")
    _print_table(summary)
    return summary
