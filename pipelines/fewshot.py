"""Job `headct fewshot`: few-shot linear probes on cached features, mean and spread over seeds.

Recipe: read the split files and the feature cache (`headct extract`); per label, skip (with the reason) when val
or test lack positives or negatives; per K, draw K positive and K negative train patients without replacement
(one scan each) per seed (`headct.eval.fewshot.sample_shots`: the same draw for every model, so models are
compared on identical examples), skip a K the train split cannot supply with a message; fit the linear-probe
protocol (standardise on the 2K scans, logistic regression per C, C and threshold chosen on val), score test once.
With `fewshot.select_by`, the cached variants are grouped by arm and, at each K on its own, each arm keeps the
variant with the best val AUROC averaged over those labels and the seeds (the K-shot draws are the evaluation's);
the arm is reported under its own name and metrics.json's "selection" records the choice and the val figures.
Outputs under cfg.report_dir: metrics.json, predictions.csv (test rows, mode `fewshot`, k and seed filled),
fewshot.png (AUROC vs K, band = min..max over seeds, a panel per label plus the mean over labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headct.config.base import JobContext
from headct.config.evaluate import FewshotConfig

MEAN_PANEL = "mean over labels"


def _fit_seeds(
    data: dict[str, Any], samples: list[Any], label: str, model: str, k: int, c_grid: Any
) -> tuple:
    """One probe per seed's sample -> (per-seed test AUROC, per-seed AP, prediction frames)."""
    from headct.eval.fewshot import subset
    from headct.eval.metrics import auroc, average_precision
    from headct.eval.probe import fit_probe, predictions_frame

    aurocs, aps, rows = [], [], []
    for seed, sample in enumerate(samples):
        fit = fit_probe(subset(data["train"], sample.index), data["val"], c_grid)
        score = fit.score(data["test"].x)
        aurocs.append(auroc(data["test"].y, score))
        aps.append(average_precision(data["test"].y, score))
        rows.append(
            predictions_frame(data["test"], "test", label, model, score, fit.threshold, seed, "fewshot", k)
        )
    return aurocs, aps, rows


def _entry(aurocs: list[float], aps: list[float]) -> dict[str, Any]:
    from headct.eval.fewshot import spread

    out: dict[str, Any] = {f"auroc_{k}": v for k, v in spread(aurocs).items()}
    out.update({f"ap_{k}": v for k, v in spread(aps).items() if k != "n_seeds"})
    out["auroc_per_seed"] = [float(a) for a in aurocs]
    return out


def _select(
    cfg: FewshotConfig, frames: dict[str, Any], features: dict[str, Any], arms: dict[str, list[str]]
) -> tuple[dict[str, dict[int, str]], dict[str, Any]]:
    """Per arm and K, the variant with the best val AUROC averaged over `cfg.select_by` labels and the seeds
    (the same K-shot draws the evaluation uses) -> ({arm: {K: variant}}, the "selection" record). A K at which
    no select_by label can be drawn keeps the arm's first variant (its default one), recorded as such."""
    from rich import print as rprint

    from headct.eval.fewshot import sample_shots, subset
    from headct.eval.labels import requested_labels, skip_reason
    from headct.eval.probe import choose_variant, fit_probe, label_data

    assert cfg.select_by is not None
    usable, skipped = [], {}
    for label in requested_labels(cfg.select_by, frames, cfg.splits):
        reason = skip_reason({"val": frames["val"][label]}, cfg.min_positives)  # test is not looked at
        if reason is None:
            usable.append(label)
        else:
            skipped[label] = reason
    data = {
        label: {v: {s: label_data(frames[s], features[v][s], label) for s in ("train", "val")} for v in features}
        for label in usable
    }
    choice: dict[str, dict[int, str]] = {arm: {} for arm in arms}
    record: dict[str, Any] = {"select_by": list(cfg.select_by), "skipped": skipped, "arms": {a: {} for a in arms}}
    for k in cfg.shots:
        draws = {label: [sample_shots(next(iter(data[label].values()))["train"], k, seed, label)
                         for seed in cfg.draw_seeds] for label in usable}
        labels_k = [label for label in usable if draws[label][0].index is not None]
        for arm, variants in arms.items():
            val: dict[str, dict[str, float]] = {v: {} for v in variants}
            for variant in variants:
                for label in labels_k:
                    part = data[label][variant]
                    per_seed = [fit_probe(subset(part["train"], d.index), part["val"], cfg.c_grid)
                                for d in draws[label]]
                    val[variant][label] = float(np.mean([f.val_auroc[f.c] for f in per_seed]))
            chosen, means = choose_variant(val) if labels_k else (variants[0], {})
            choice[arm][k] = chosen
            record["arms"][arm][str(k)] = {"chosen": chosen, "labels": labels_k, "val_auroc_mean": means}
            if len(variants) > 1:
                rprint(f"{arm} K={k}: {chosen} chosen on val among {len(variants)} variants")
    return choice, record


def _evaluate(
    cfg: FewshotConfig, frames: dict[str, Any], features: dict[str, Any], labels: list[str],
    choice: dict[str, dict[int, str]],
) -> tuple:
    """`choice[model][K]` names the cached features a model (an arm under selection) is evaluated with at K."""
    from rich import print as rprint

    from headct.eval.fewshot import sample_shots
    from headct.eval.labels import skip_reason
    from headct.eval.probe import label_data

    models = list(choice)
    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in models}
    skipped: dict[str, str] = {}
    skipped_shots: dict[str, dict[str, str]] = {}
    predictions = []
    for label in labels:
        data = {v: {s: label_data(frames[s], features[v][s], label) for s in frames} for v in features}
        first = next(iter(data.values()))
        reason = skip_reason({"val": first["val"].y, "test": first["test"].y}, cfg.min_positives)
        if reason is not None:
            rprint(f"[yellow]skip {label}:[/] {reason}")
            skipped[label] = reason
            continue
        for k in cfg.shots:
            samples = [sample_shots(first["train"], k, seed, label) for seed in cfg.draw_seeds]
            if samples[0].index is None:
                rprint(f"[yellow]skip {label} K={k}:[/] {samples[0].reason}")
                skipped_shots.setdefault(label, {})[str(k)] = str(samples[0].reason)
                continue
            for model in models:
                aurocs, aps, rows = _fit_seeds(data[choice[model][k]], samples, label, model, k, cfg.c_grid)
                results[model].setdefault(label, {})[str(k)] = _entry(aurocs, aps)
                predictions += rows
    return results, skipped, skipped_shots, predictions


def _mean_over_labels(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per model and K: per seed, the mean AUROC over the labels evaluated at that K; then spread over seeds."""
    from headct.eval.fewshot import spread

    out: dict[str, dict[str, Any]] = {}
    for model, by_label in results.items():
        per_k: dict[str, list[list[float]]] = {}
        for by_k in by_label.values():
            for k, entry in by_k.items():
                per_k.setdefault(k, []).append(entry["auroc_per_seed"])
        out[model] = {
            k: {
                **{f"auroc_{s}": v for s, v in spread(list(np.mean(seeds, axis=0))).items()},
                "n_labels": len(seeds),
            }
            for k, seeds in sorted(per_k.items(), key=lambda item: int(item[0]))
        }
    return out


def _curves(results: dict[str, Any], mean: dict[str, Any]) -> dict[str, dict[str, dict[int, tuple]]]:
    panels: dict[str, dict[str, dict[int, tuple]]] = {MEAN_PANEL: {}}
    for model, by_k in mean.items():
        panels[MEAN_PANEL][model] = {
            int(k): (e["auroc_mean"], e["auroc_min"], e["auroc_max"]) for k, e in by_k.items()
        }
    for model, by_label in results.items():
        for label, by_k in by_label.items():
            panels.setdefault(label, {})[model] = {
                int(k): (e["auroc_mean"], e["auroc_min"], e["auroc_max"]) for k, e in by_k.items()
            }
    return panels if mean and any(mean.values()) else {}


def _write_outputs(cfg: FewshotConfig, metrics: dict[str, Any], predictions: list[Any]) -> list[Path]:
    import pandas as pd

    from headct.eval import PREDICTION_COLUMNS
    from headct.eval.plots import plot_fewshot_curves
    from headct.headline import write_stage_headline
    from headct.io import atomic_path, write_json

    write_json(cfg.report_dir / "metrics.json", metrics)
    write_stage_headline(cfg.report_dir, "fewshot", metrics)  # the DVC metric: a few numbers of it
    table = (
        pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=PREDICTION_COLUMNS)
    )
    with atomic_path(cfg.report_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    plot_fewshot_curves(
        _curves(metrics["results"], metrics["mean_over_labels"]),
        cfg.report_dir / "fewshot.png",
        f"few-shot test AUROC vs K (mean, band min-max over {cfg.seeds} seeds)",
    )
    return [cfg.report_dir / name for name in ("metrics.json", "predictions.csv", "fewshot.png")]


def _print_table(metrics: dict[str, Any], shots: tuple[int, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="few-shot test AUROC: mean ± std over seeds [min, max]")
    table.add_column("model")
    table.add_column("label")
    for k in shots:
        table.add_column(f"K={k}", justify="right")
    rows = {
        m: {**by_label, MEAN_PANEL: metrics["mean_over_labels"][m]}
        for m, by_label in metrics["results"].items()
    }
    for model, by_label in rows.items():
        for label, by_k in by_label.items():
            cells = [
                f"{e['auroc_mean']:.3f} ± {e['auroc_std']:.3f} [{e['auroc_min']:.2f}, {e['auroc_max']:.2f}]"
                if (e := by_k.get(str(k)))
                else "-"
                for k in shots
            ]
            table.add_row(model, label, *cells)
    console = Console()
    console.print(table)
    for label, reason in metrics["skipped"].items():
        console.print(f"skipped {label}: {reason}")


def run(cfg: FewshotConfig, ctx: JobContext) -> dict[str, Any]:
    from headct import tracking
    from headct.data.splits import read_splits
    from headct.eval.feature_cache import arms_of, read_cache, split_features
    from headct.eval.labels import requested_labels

    frames = read_splits(cfg.splits)
    labels = requested_labels(cfg.labels, frames, cfg.splits)
    cache = read_cache(cfg.features, cfg.models, ctx.root)
    features = split_features(cache, frames, cfg.features)
    selection = None
    if cfg.select_by is not None:
        choice, selection = _select(cfg, frames, features, arms_of(cache))
    else:
        choice = {m: dict.fromkeys(cfg.shots, m) for m in features}
    results, skipped, skipped_shots, predictions = _evaluate(cfg, frames, features, labels, choice)
    metrics = {
        "models": list(choice),
        "shots": list(cfg.shots),
        "seeds": cfg.seeds,
        "results": results,
        "mean_over_labels": _mean_over_labels(results),
        "skipped": skipped,
        "skipped_shots": skipped_shots,
    }
    if selection is not None:
        metrics["selection"] = selection
    outputs = _write_outputs(cfg, metrics, predictions)

    with tracking.job_run(ctx.tracking, "fewshot", cfg, ctx.root) as mlrun:
        mlrun.log_metrics(
            {"labels_evaluated": len(next(iter(results.values()), {})), "labels_skipped": len(skipped)}
        )
        for model, by_k in metrics["mean_over_labels"].items():
            for k, summary in by_k.items():
                with mlrun.child(f"{model}/K={k}", params={"model": model, "k": int(k)}) as child:
                    flat = {
                        f"{label}.{name}": v
                        for label, per_k in results[model].items()
                        if k in per_k
                        for name, v in per_k[k].items()
                        if isinstance(v, int | float)
                    }
                    child.log_metrics({**flat, **{f"mean.{n}": v for n, v in summary.items()}})
        if skipped:
            mlrun.set_tags({f"skipped.{label}": reason for label, reason in skipped.items()})
        for path in outputs:
            mlrun.log_artifact(path, "fewshot")
    _print_table(metrics, cfg.shots)
    return {
        "labels_evaluated": len(next(iter(results.values()), {})),
        "labels_skipped": len(skipped),
        "mean_auroc": {
            m: {k: round(e["auroc_mean"], 4) for k, e in by_k.items()}
            for m, by_k in metrics["mean_over_labels"].items()
        },
    }
