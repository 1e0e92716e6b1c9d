"""Job `headct retrieval`: query-by-embedding over one split (test by default), mAP per label and model.

Each scan queries every other scan of the split except its own patient's, ranked by cosine similarity of the
cached embeddings (`headct extract`); see headct/eval/retrieval.py for the mAP definition. A label with fewer
than `min_positives` positives in the split is skipped with the reason (headct/eval/labels.py).
Outputs under cfg.report_dir: metrics.json ({model: {label: {map, chance, n_queries, n_candidates}}, skipped}),
retrieval.png (bars per label and model, chance marked).
"""

from __future__ import annotations

from typing import Any

from headct.config.base import JobContext
from headct.config.evaluate import RetrievalConfig


def run(cfg: RetrievalConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.data.splits import read_splits
    from headct.eval.feature_cache import read_cache
    from headct.eval.labels import requested_labels, skip_reason
    from headct.eval.plots import plot_retrieval_bars
    from headct.eval.probe import label_data
    from headct.eval.retrieval import retrieval_map
    from headct.headline import write_stage_headline
    from headct.io import write_json

    frames = read_splits(cfg.splits)
    labels = requested_labels(cfg.labels, frames, cfg.splits)
    frame = frames[cfg.split]
    cache = read_cache(cfg.features, cfg.models, ctx.root)
    features = {m: fs.for_frame(frame, cfg.features / f"{m}.npz") for m, fs in cache.items()}
    results: dict[str, dict[str, Any]] = {m: {} for m in features}
    chance: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for label in labels:
        # AP is defined over positive queries: the split needs positives, not negatives
        reason = skip_reason({cfg.split: frame[label]}, cfg.min_positives, negatives=False)
        if reason is not None:
            skipped[label] = reason
            continue
        for model, x in features.items():
            data = label_data(frame, x, label)
            results[model][label] = retrieval_map(data.x, data.y, data.patient_id)
        chance[label] = results[next(iter(features))][label]["chance"]
    metrics = {**results, "skipped": skipped, "split": cfg.split}
    write_json(cfg.report_dir / "metrics.json", metrics)
    write_stage_headline(cfg.report_dir, "retrieval", metrics)  # the DVC metric: a few numbers of it
    scores = {m: {label: r["map"] for label, r in by_label.items()} for m, by_label in results.items()}
    plot_retrieval_bars(
        scores, chance, cfg.report_dir / "retrieval.png", f"retrieval mAP ({cfg.split}, cosine)"
    )

    with tracking.job_run(ctx.tracking, "retrieval", cfg, ctx.root) as mlrun:
        mlrun.log_metrics(
            {f"{m}.{label}.map": v for m, by_label in scores.items() for label, v in by_label.items()}
        )
        if skipped:
            mlrun.set_tags({f"skipped.{label}": reason for label, reason in skipped.items()})
        for name in ("metrics.json", "retrieval.png"):
            mlrun.log_artifact(cfg.report_dir / name, "retrieval")

    table = Table(title=f"retrieval mAP ({cfg.split}, cosine, same patient excluded)")
    for column in ("label", "queries", "chance", *features):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, base in chance.items():
        row = results[next(iter(features))][label]
        table.add_row(
            label, str(row["n_queries"]), f"{base:.3f}", *(f"{scores[m][label]:.3f}" for m in features)
        )
    console = Console()
    console.print(table)
    for label, reason in skipped.items():
        console.print(f"skipped {label}: {reason}")
    return {
        "labels": len(chance),
        "labels_skipped": len(skipped),
        "mean_map": {m: round(sum(v.values()) / len(v), 4) if v else None for m, v in scores.items()},
    }
