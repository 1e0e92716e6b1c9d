"""Job `headct probe`: frozen encoder -> per-label linear probes, pre-trained vs random init, same protocol.

Recipe: read the split files; load the pre-trained encoder and build a seeded random-init twin of the same
architecture; embed train/val/test once per encoder; per label, skip (with the reason) when a split lacks
positives or negatives, else standardise on train, fit a logistic regression per C, choose C and the decision
threshold on val, score test once, bootstrap patient-level 95% CIs.
With `probe.features` set (a cache from `headct extract`), every cached model is probed instead (e.g. with the
HU-histogram baseline and external encoders) and nothing is embedded here. With `probe.select_by` too, the cached
variants are grouped by arm and each arm keeps the variant whose probes have the best mean val AUROC over those
labels (test never enters the choice); the arm is then probed under its own name, and metrics.json records the
choice and the val figures ("selection") apart from a test AUROC of every variant ("diagnostic", not a result).
Outputs under cfg.report_dir: metrics.json (per model and label: test metrics with CIs, Brier/ECE, patient-level
AUROC with its CI, series and patient counts, AUROC by subgroup where the store's manifest is found),
predictions.csv, roc.png, pr.png, reliability.png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from headct.config.base import JobContext
from headct.config.evaluate import ProbeConfig
from headct.errors import InputError
from headct.eval import PROBE_META_KEYS

MODELS: tuple[str, ...] = ("pretrained", "random_init")


def _print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def cell(m: dict[str, Any] | None) -> str:
        if m is None:
            return "-"
        low, high = m["auroc_low"], m["auroc_high"]
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        return f"{m['auroc']:.3f}{ci}"

    models = [m for m in metrics if m not in PROBE_META_KEYS]
    table = Table(title="linear probe: test AUROC [95% CI, patient bootstrap]")
    for name in ("label", "test pos/neg", *models, f"C ({models[0]})"):
        table.add_column(name, justify="left" if name == "label" else "right")
    for label, m in metrics[models[0]].items():
        cells = [cell(metrics[other].get(label)) for other in models]
        table.add_row(label, f"{m['n_pos']}/{m['n_neg']}", *cells, f"{m['C']:g}")
    console = Console()
    console.print(table)
    for label, reason in metrics["skipped"].items():
        console.print(f"skipped {label}: {reason}")
    for arm, choice in metrics.get("selection", {}).get("arms", {}).items():
        mean = choice["val_auroc_mean"].get(choice["chosen"])
        on_val = f" (mean val AUROC {mean:.3f})" if mean is not None else ""
        console.print(f"{arm}: variant {choice['chosen']}{on_val}")


def _embed(
    encoders: dict[str, Any],
    frames: dict[str, Any],
    config: dict[str, Any],
    cfg: ProbeConfig,
    ctx: JobContext,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Features (n, D) per model and split, computed once; and the seconds each model took."""
    from rich import print as rprint

    from headct.device import resolve_device
    from headct.eval.features import extract_features

    device = resolve_device(cfg.device)
    shape = config.get("preprocess", {}).get("shape")
    n_scans = sum(len(f) for f in frames.values())
    features: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for model, encoder in encoders.items():
        start = time.perf_counter()
        features[model] = {
            split: extract_features(
                encoder,
                [ctx.root / p for p in frame["img_path"]],
                config["windows"],
                pool=cfg.pool,
                batch_size=cfg.batch_size,
                device=device,
                shape=shape,
                description=f"{model} {split}",
            )
            for split, frame in frames.items()
        }
        encoder.to("cpu")  # free accelerator memory for the next encoder
        seconds[model] = time.perf_counter() - start
        rprint(f"features[{model}]: {n_scans} scans in {seconds[model]:.1f} s on {device} (pool={cfg.pool})")
    return features, seconds


def _probe_labels(
    labels: list[str], frames: dict[str, Any], features: dict[str, dict[str, Any]], cfg: ProbeConfig
) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """metrics.json content ({"pretrained", "random_init", "skipped"}) and the prediction frames."""
    from rich import print as rprint

    from headct.eval.labels import skip_reason
    from headct.eval.probe import label_data, probe_label

    models = list(features)
    metrics: dict[str, dict[str, Any]] = {**{m: {} for m in models}, "skipped": {}}
    predictions = []
    for label in labels:
        data = {m: {s: label_data(frames[s], features[m][s], label) for s in frames} for m in models}
        # targets are the same for every model
        reason = skip_reason({split: part.y for split, part in data[models[0]].items()}, cfg.min_positives)
        if reason is not None:
            rprint(f"[yellow]skip {label}:[/] {reason}")
            metrics["skipped"][label] = reason
            continue
        for model in models:
            # Same bootstrap seed for every model: paired resamples, so their CIs are comparable.
            result, rows = probe_label(data[model], label, model, cfg.c_grid, cfg.bootstrap, cfg.seed)
            metrics[model][label] = result
            predictions.append(rows)
    return metrics, predictions


def _select_variants(
    cfg: ProbeConfig, frames: dict[str, Any], features: dict[str, dict[str, Any]], cache: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Per arm, the variant with the best mean val AUROC over `cfg.select_by` -> (features per arm, the
    "selection" record, the "diagnostic" test AUROCs of every variant on those labels)."""
    from rich import print as rprint

    from headct.eval.feature_cache import arms_of
    from headct.eval.labels import requested_labels, skip_reason
    from headct.eval.metrics import auroc
    from headct.eval.probe import choose_variant, fit_probe, label_data

    assert cfg.select_by is not None
    skipped: dict[str, str] = {}
    usable = []
    for label in requested_labels(cfg.select_by, frames, cfg.splits):
        # Only train and val decide whether a label can choose (test is not looked at).
        reason = skip_reason({s: frames[s][label] for s in ("train", "val")}, cfg.min_positives)
        if reason is None:
            usable.append(label)
        else:
            skipped[label] = reason
    arms = arms_of(cache)
    if not usable and any(len(v) > 1 for v in arms.values()):
        raise InputError(
            f"{cfg.splits}: no label of probe.select_by {cfg.select_by} can choose among the cached variants: "
            + "; ".join(f"{label}: {reason}" for label, reason in skipped.items())
        )
    record: dict[str, Any] = {"select_by": list(cfg.select_by), "labels": usable, "skipped": skipped, "arms": {}}
    diagnostic: dict[str, Any] = {}
    chosen_features = {}
    for arm, variants in arms.items():
        val: dict[str, dict[str, float]] = {v: {} for v in variants}
        test: dict[str, dict[str, float]] = {v: {} for v in variants}
        for variant in variants:
            for label in usable:
                data = {s: label_data(frames[s], features[variant][s], label) for s in frames}
                fit = fit_probe(data["train"], data["val"], cfg.c_grid)
                val[variant][label] = fit.val_auroc[fit.c]
                if 0 < data["test"].y.sum() < len(data["test"].y):
                    test[variant][label] = auroc(data["test"].y, fit.score(data["test"].x))
        chosen, means = choose_variant(val) if usable else (variants[0], {})
        record["arms"][arm] = {"chosen": chosen, "val_auroc_mean": means, "val_auroc": val}
        diagnostic[arm] = test
        chosen_features[arm] = features[chosen]
        rprint(f"{arm}: {chosen} chosen on val among {len(variants)} variant(s)")
    note = ("test AUROC of every variant on the select_by labels, for inspection only: never used to choose, "
            "not a result (the arms' results are the chosen variants')")
    return chosen_features, record, {"note": note, "test_auroc": diagnostic}


def _subgroups_of_store(cfg: ProbeConfig, ctx: JobContext) -> Any:
    """scan_id -> subgroup columns from the manifest of the store behind the splits, or None if not found."""
    import pandas as pd

    from headct.data.splits import store_of_split
    from headct.eval.subgroups import subgroup_table

    store = store_of_split(cfg.splits, ctx.root)
    manifest = store / "manifest.parquet" if store is not None else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        return subgroup_table(pd.read_parquet(manifest))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{manifest}: cannot read the subgroup columns ({exc})") from exc


def _add_test_breakdowns(metrics: dict[str, Any], table: Any, cfg: ProbeConfig, ctx: JobContext) -> None:
    """Per model and label: patient-level (max over series) test AUROC with its 95% CI, the series counts beside
    the patient counts and, where the manifest is found, AUROC by subgroup (subgroups with < 5 positives or
    negatives are listed as skipped with the reason)."""
    from headct.eval.metrics import auroc, patient_bootstrap, patient_level
    from headct.eval.subgroups import subgroup_auroc

    groups = _subgroups_of_store(cfg, ctx)
    test = table[table["split"] == "test"]
    for (model, label), rows in test.groupby(["model", "label"], sort=False):
        y, score = rows["target"].to_numpy(), rows["score"].to_numpy()
        y_p, score_p, ids = patient_level(y, score, rows["patient_id"].to_numpy())
        entry = metrics[model][label]
        entry["auroc_patient"] = entry["auroc_patient_low"] = entry["auroc_patient_high"] = None
        if 0 < y_p.sum() < len(y_p):
            entry["auroc_patient"] = auroc(y_p, score_p)
            # One score per patient, so resampling these rows is resampling patients: the same bootstrap, seed
            # and resample count as the per-scan CI (whose resamples keep a patient's series together).
            boot = patient_bootstrap(y_p, score_p, ids, entry["threshold"], cfg.bootstrap, cfg.seed)
            entry["auroc_patient_low"], entry["auroc_patient_high"] = boot.intervals["auroc"]
        entry["n_patients_pos"] = int(y_p.sum())
        entry["n_series"], entry["n_series_pos"] = int(len(y)), int(y.sum())
        if groups is not None:
            aligned = rows[["scan_id"]].merge(groups, on="scan_id", how="left").drop(columns="scan_id")
            entry["subgroups"] = subgroup_auroc(y, score, aligned)


def _write_outputs(
    cfg: ProbeConfig, ctx: JobContext, metrics: dict[str, Any], predictions: list[Any]
) -> list[Path]:
    import pandas as pd

    from headct.eval import PREDICTION_COLUMNS
    from headct.eval.plots import plot_pr_grid, plot_reliability_grid, plot_roc_grid
    from headct.headline import write_stage_headline
    from headct.io import atomic_path, write_json

    table = (
        pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=PREDICTION_COLUMNS)
    )
    _add_test_breakdowns(metrics, table, cfg, ctx)
    write_json(cfg.report_dir / "metrics.json", metrics)
    write_stage_headline(cfg.report_dir, "probe", metrics)  # the DVC metric: a few numbers of it
    with atomic_path(cfg.report_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    test = table[table["split"] == "test"]
    panels = {
        label: {
            m: (g["target"].to_numpy(), g["score"].to_numpy()) for m, g in rows.groupby("model", sort=False)
        }
        for label, rows in test.groupby("label", sort=False)
    }
    plot_roc_grid(panels, cfg.report_dir / "roc.png", "linear probe ROC (test)")
    plot_pr_grid(panels, cfg.report_dir / "pr.png", "linear probe precision-recall (test)")
    plot_reliability_grid(panels, cfg.report_dir / "reliability.png", "linear probe reliability (test)")
    names = ("metrics.json", "predictions.csv", "roc.png", "pr.png", "reliability.png")
    return [cfg.report_dir / name for name in names]


def run(cfg: ProbeConfig, ctx: JobContext) -> dict[str, Any]:
    import torch

    from headct import tracking
    from headct.data.splits import read_splits
    from headct.data.volumes import check_preprocessing
    from headct.eval.labels import requested_labels
    from headct.models.model_dir import CONFIG, load_model_dir
    from headct.models.vit import build_encoder

    frames = read_splits(cfg.splits)
    labels = requested_labels(cfg.labels, frames, cfg.splits)
    if cfg.features is not None:  # features extracted once by `headct extract`
        from headct.eval.feature_cache import read_cache, split_features

        cache = read_cache(cfg.features, root=ctx.root)
        features, seconds = split_features(cache, frames, cfg.features), {}
        if cfg.select_by is not None:
            features, selection, diagnostic = _select_variants(cfg, frames, features, cache)
    else:
        pretrained, config = load_model_dir(cfg.model_dir)
        check_preprocessing(cfg.splits, ctx.root, config, cfg.model_dir / CONFIG,
                            allow_mismatch=cfg.allow_preprocess_mismatch, setting="probe.allow_preprocess_mismatch")
        torch.manual_seed(cfg.seed)  # the random-init twin: same architecture and windows, seeded
        encoders = {"pretrained": pretrained, "random_init": build_encoder(config["arch"])}
        features, seconds = _embed(encoders, frames, config, cfg, ctx)
    metrics, predictions = _probe_labels(labels, frames, features, cfg)
    if cfg.select_by is not None:
        metrics.update(selection=selection, diagnostic=diagnostic)
    outputs = _write_outputs(cfg, ctx, metrics, predictions)

    with tracking.job_run(ctx.tracking, "probe", cfg, ctx.root) as mlrun:
        mlrun.log_metrics({f"features_seconds.{m}": s for m, s in seconds.items()})
        models = [m for m in metrics if m not in PROBE_META_KEYS]
        mlrun.log_metrics(
            {"labels_probed": len(metrics[models[0]]), "labels_skipped": len(metrics["skipped"])}
        )
        for model in models:
            for label, result in metrics[model].items():
                with mlrun.child(f"{model}/{label}", params={"model": model, "label": label}) as child:
                    child.log_metrics({k: v for k, v in result.items() if isinstance(v, int | float)})
        if metrics["skipped"]:
            mlrun.set_tags({f"skipped.{label}": reason for label, reason in metrics["skipped"].items()})
        for path in outputs:
            mlrun.log_artifact(path, "probe")
    _print_table(metrics)
    return {
        "labels_probed": len(metrics[models[0]]),
        "labels_skipped": len(metrics["skipped"]),
        "features_seconds": {m: round(s, 2) for m, s in seconds.items()},
    }
