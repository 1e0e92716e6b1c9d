"""Job `headct finetune`: encoder + head trained end to end on the split's labels, best epoch on val AUROC.

Recipe: read train and val (test is read only at the very end) -> keep the labels with at least
`min_positives` positives and negatives in train and val -> build the classifier (pre-trained encoder,
its random-init twin, or a MONAI 3D ResNet from scratch) -> fine-tune on the one training engine, scoring
val every epoch (one MLflow metric step per epoch) -> restore the best epoch -> thresholds by Youden's J on val
per label -> read test and score it once -> metrics with patient-bootstrap 95% CIs, predictions CSV, ROC
plot, classifier directory whose config.json records what validation earned per label (`performance`: val AUROC
and operating point with CIs, and test's; the validation gate of headct/eval/validation_gate.py reads it) ->
registered as a new MLflow model version of `register_as`, described by that gate. Data, model and loop are
library code (headct/train/finetune_data.py, headct/train/finetune.py), shared with `headct tune`.

Outputs: cfg.out_dir (the classifier directory: model.safetensors + config.json, loaded by
`headct.models.classifier_dir.load_classifier`), cfg.report_dir/{metrics.json, predictions.csv, roc.png,
history.json}; cfg.checkpoint_dir/<run key>/last.pt (state after the latest epoch, written atomically).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headct.config.base import JobContext, dump_params
from headct.config.finetune import FinetuneConfig
from headct.errors import InputError

MODE = "finetune"


def _label_rows(frame: Any, label: str, scores: np.ndarray, split: str, model: str, threshold: float,
                seed: int) -> tuple[Any, Any]:
    """(LabelData of the known rows, their prediction rows in the DESIGN.md schema)."""
    from headct.eval.probe import label_data, predictions_frame

    part = label_data(frame, scores[:, None], label)
    rows = predictions_frame(part, split, label, model, part.x[:, 0], threshold, seed)
    rows["mode"] = MODE
    return part, rows


def evaluate(
    cfg: FinetuneConfig, ctx: JobContext, data: Any, classifier: Any, windows: list[Any], shape: Any,
) -> tuple[dict[str, Any], Any, dict[str, float], dict[str, Any]]:
    """Thresholds on val, then test read and scored ONCE -> (metrics, predictions frame, thresholds, performance
    record for config.json: val AUROC and operating point with patient-bootstrap CIs, and test's where scored)."""
    import pandas as pd

    from headct.data.splits import read_split
    from headct.eval.features import score_volumes
    from headct.eval.metrics import evaluate_binary, youden_threshold
    from headct.eval.validation_gate import performance_record

    val_probs = score_volumes(classifier, [ctx.root / p for p in data.val["img_path"]], windows,
                              cfg.eval_batch_size, shape, "val")
    thresholds, rows, metrics = {}, [], {"labels": {}, "skipped": dict(data.skipped)}
    val_metrics = {}
    for j, label in enumerate(data.labels):
        part, val_rows = _label_rows(data.val, label, val_probs[:, j], "val", data.model_name, 0.0, cfg.seed)
        thresholds[label] = youden_threshold(part.y, part.x[:, 0])
        val_rows["threshold"] = thresholds[label]
        rows.append(val_rows)
        # What validation earned (the gate of `headct predict`): AUROC and the operating point, with CIs.
        val_metrics[label] = evaluate_binary(part.y, part.x[:, 0], part.patient_id, thresholds[label],
                                             cfg.bootstrap, cfg.seed)
    test = read_split(cfg.splits, "test")  # the one read of test, after every choice is made
    leaked = set(test["patient_id"]) & (set(data.train["patient_id"]) | set(data.val["patient_id"]))
    if leaked:
        raise InputError(f"{cfg.splits / 'test.csv'}: {len(leaked)} patient(s) also in train/val")
    test_probs = score_volumes(classifier, [ctx.root / p for p in test["img_path"]], windows,
                               cfg.eval_batch_size, shape, "test")
    for j, label in enumerate(data.labels):
        if label not in test.columns:
            metrics["skipped"][label] = "test.csv has no column for it"
            continue
        part, test_rows = _label_rows(test, label, test_probs[:, j], "test", data.model_name, thresholds[label],
                                      cfg.seed)
        rows.append(test_rows)
        if not ((part.y == 1).any() and (part.y == 0).any()):
            metrics["skipped"][label] = "test lacks positives or negatives (threshold and predictions kept)"
            continue
        metrics["labels"][label] = evaluate_binary(part.y, part.x[:, 0], part.patient_id, thresholds[label],
                                                   cfg.bootstrap, cfg.seed)
    performance = performance_record(val_metrics, metrics["labels"], cfg.bootstrap)
    return metrics, pd.concat(rows, ignore_index=True), thresholds, performance


def _write_reports(cfg: FinetuneConfig, metrics: dict[str, Any], table: Any, history: list[Any]) -> list[Path]:
    from headct.config.finetune import CeilingConfig
    from headct.eval.plots import plot_pr_grid, plot_reliability_grid, plot_roc_grid
    from headct.headline import write_stage_headline
    from headct.io import atomic_path, write_json

    write_json(cfg.report_dir / "metrics.json", metrics)
    stage = "ceiling" if isinstance(cfg, CeilingConfig) else "finetune"  # `headct ceiling` runs this job too
    write_stage_headline(cfg.report_dir, stage, metrics)  # the DVC metric: a few numbers of it
    write_json(cfg.report_dir / "history.json", history)
    with atomic_path(cfg.report_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    test = table[table["split"] == "test"]
    panels = {label: {model: (g["target"].to_numpy(), g["score"].to_numpy()) for model, g in rows.groupby("model")}
              for label, rows in test.groupby("label", sort=False) if label in metrics["labels"]}
    plot_roc_grid(panels, cfg.report_dir / "roc.png", f"fine-tuned {metrics['model']} ROC (test)")
    plot_pr_grid(panels, cfg.report_dir / "pr.png", f"fine-tuned {metrics['model']} precision-recall (test)")
    plot_reliability_grid(panels, cfg.report_dir / "reliability.png",
                          f"fine-tuned {metrics['model']} reliability (test)")
    return [cfg.report_dir / n for n in ("metrics.json", "history.json", "predictions.csv", "roc.png", "pr.png",
                                         "reliability.png")]


def _print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fine-tune ({metrics['model']}, best epoch {metrics['best_epoch'] + 1}): test metrics "
                        "[95% CI, patient bootstrap]")
    for name in ("label", "test pos/neg", "AUROC", "AP", "sens / spec", "val AUROC"):
        table.add_column(name, justify="left" if name == "label" else "right")
    for label, m in metrics["labels"].items():
        ci = f" [{m['auroc_low']:.3f}, {m['auroc_high']:.3f}]" if m["auroc_low"] is not None else ""
        table.add_row(label, f"{m['n_pos']}/{m['n_neg']}", f"{m['auroc']:.3f}{ci}", f"{m['ap']:.3f}",
                      f"{m['sensitivity']:.2f} / {m['specificity']:.2f}",
                      f"{metrics['best_val_auroc'].get(label, float('nan')):.3f}")
    console = Console()
    console.print(table)
    for label, reason in metrics["skipped"].items():
        console.print(f"skipped {label}: {reason}")


def run_identity(cfg: FinetuneConfig) -> dict[str, Any]:
    """What fixes a fine-tuning trajectory (headct.run_identity): the trajectory settings and the bytes of the
    inputs (the encoder's weights, the split files), so a checkpoint is resumed only by the run that wrote it."""
    from headct.run_identity import inputs_sha256, trajectory_params

    inputs = sorted(Path(cfg.splits).glob("*.csv"))
    if cfg.init == "pretrained" and cfg.arch in ("vit", "cnn"):  # weights read from the model directory
        inputs.append(Path(cfg.model_dir) / "model.safetensors")
    return {**trajectory_params(cfg), "inputs_sha256": inputs_sha256(inputs)}


def run(cfg: FinetuneConfig, ctx: JobContext) -> dict[str, Any]:
    import torch
    from rich.console import Console
    from rich.markup import escape

    from headct import model_card, tracking
    from headct.data.splits import path_for_files
    from headct.device import resolve_device
    from headct.eval.validation_gate import GateRule, describe, judge
    from headct.io import remove_stale_temps
    from headct.models.classifier_dir import save_classifier
    from headct.run_identity import run_key
    from headct.run_meta import describe as describe_run
    from headct.train.checkpoint import load_for_resume, save_checkpoint
    from headct.train.finetune_data import from_model_dir, load_data, train_classifier
    from headct.train.preemption import Preempted, PreemptionGuard

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_data(cfg, ctx.root)
    identity = run_identity(cfg)
    checkpoint = cfg.checkpoint_dir / run_key(identity) / "last.pt" if cfg.checkpoint_dir is not None else None
    # A run killed between writing a file and renaming it left its temp file: the outputs must hold the job's
    # files only (they are DVC outputs and MLflow artifacts), so what a killed run left goes first.
    for folder in (cfg.out_dir, cfg.report_dir, *([checkpoint.parent] if checkpoint is not None else [])):
        remove_stale_temps(folder)
    resume = load_for_resume(checkpoint, identity, "finetune.checkpoint_dir")

    def save_state(step: int, model: Any, optimizer: Any, extra: dict[str, Any]) -> Path | None:
        if checkpoint is None:
            return None
        save_checkpoint(checkpoint, model, optimizer, step, identity, extra)
        return checkpoint

    tags = {"headct.model": data.model_name, "headct.labels": ",".join(data.labels)}
    run_name = describe_run("finetune", cfg.model_copy(update={"labels": data.labels}))[0]  # e.g. "finetune ICH ..."
    with tracking.job_run(ctx.tracking, "finetune", cfg, ctx.root, tags=tags, run_name=run_name) as mlrun:
        def on_epoch(epoch: int, record: dict[str, Any]) -> None:
            mlrun.log_metrics({"val_auroc_mean": record["val_auroc_mean"], "train_loss": record["train_loss"],
                               **{f"val_auroc.{k}": v for k, v in record["val_auroc"].items()}}, step=epoch + 1)

        if resume is not None:
            Console().print(f"resuming from {checkpoint} at step {int(resume['step'])}, after epoch "
                            f"{int(resume['extra']['epoch']) + 1} of {cfg.epochs}")
        try:  # SIGTERM/SIGUSR1: checkpoint at the next step, then Preempted (exit 75, headct.train.preemption)
            with PreemptionGuard():
                classifier, windows, preprocess, fitted = train_classifier(
                    cfg, ctx.root, data, device, on_epoch=on_epoch, save_state=save_state, resume=resume,
                    on_log=lambda step, m: mlrun.log_metrics({f"train.{k}": v for k, v in m.items()}, step=step))
        except Preempted as exc:
            mlrun.set_tags({"headct.preempted": f"{exc.signal_name} after step {exc.step}"})
            raise
        shape = preprocess.get("shape") or data.preprocess.get("shape")
        metrics, table, thresholds, performance = evaluate(cfg, ctx, data, classifier, windows, shape)
        best = fitted.history[fitted.best_epoch]
        metrics.update(model=data.model_name, mode=MODE, best_epoch=fitted.best_epoch,
                       best_val_auroc=best["val_auroc"], best_val_auroc_mean=fitted.best_val_auroc,
                       epochs=cfg.epochs, steps=fitted.steps, seconds=round(fitted.seconds, 2),
                       mean_test_auroc=float(np.mean([m["auroc"] for m in metrics["labels"].values()]))
                       if metrics["labels"] else None)
        outputs = _write_reports(cfg, metrics, table, fitted.history)
        save_classifier(cfg.out_dir, classifier, {
            "labels": data.labels, "thresholds": thresholds, "windows": list(windows), "preprocess": preprocess,
            "init": data.model_name, "best_epoch": fitted.best_epoch, "performance": performance,
            "provenance": {**tracking.git_state(ctx.root), "run_id": mlrun.run_id,
                           "splits": path_for_files(cfg.splits, ctx.root),
                           "model_dir": path_for_files(cfg.model_dir, ctx.root) if from_model_dir(cfg) else None,
                           # paths as the project sees them (a folder named after a person stays out)
                           "params": {**dump_params(cfg), **{k: path_for_files(getattr(cfg, k), ctx.root) for k in
                                      ("splits", "model_dir", "out_dir", "report_dir", "checkpoint_dir",
                                       "tuned_params") if getattr(cfg, k) is not None}}},
        })
        counts = {"train": len(data.train), "val": len(data.val),
                  "test": int(table.loc[table["split"] == "test", "scan_id"].nunique())}
        model_card.write_card(cfg.out_dir, model_card.finetune_facts(
            cfg, data.model_name, counts, data.labels, preprocess, list(windows), metrics,
            {"git commit": tracking.git_commit(ctx.root)}))
        mlrun.log_metrics({"best_epoch": fitted.best_epoch + 1, "best_val_auroc_mean": fitted.best_val_auroc,
                           **({"mean_test_auroc": metrics["mean_test_auroc"]} if metrics["labels"] else {}),
                           **{f"test_auroc.{k}": m["auroc"] for k, m in metrics["labels"].items()},
                           **{f"val_auroc_low.{k}": e["val"]["auroc_low"] for k, e in performance["labels"].items()
                              if e["val"]["auroc_low"] is not None}})
        for path in outputs:
            mlrun.log_artifact(path, "finetune")
        mlrun.log_artifacts(cfg.out_dir, "classifier")
        verdicts = judge({"labels": data.labels, "performance": performance}, GateRule())
        metrics["registered"] = None
        if cfg.register_as:
            from headct.classifier_registry import register_classifier

            metrics["registered"] = register_classifier(
                cfg.out_dir, cfg.register_as, list(shape), data.labels, describe(verdicts, GateRule()),
                tags={"run_id": mlrun.run_id, "model": data.model_name,
                      "validated_labels": ",".join(k for k, v in verdicts.items() if v.validated)})
    # Finished: kept for inspection, never resumed (a re-run after a code change trains again).
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.replace(checkpoint.with_name("complete.pt"))
    _print_table(metrics)
    Console().print(escape(describe(verdicts, GateRule())))  # the gate under predict's defaults
    return {"resumed_after_epoch": None if resume is None else int(resume["extra"]["epoch"]) + 1,
            "model": data.model_name, "labels": data.labels, "best_epoch": fitted.best_epoch,
            "best_val_auroc_mean": fitted.best_val_auroc, "mean_test_auroc": metrics["mean_test_auroc"],
            "classifier_dir": str(cfg.out_dir), "registered": metrics["registered"],
            "validated_labels": [k for k, v in verdicts.items() if v.validated]}
