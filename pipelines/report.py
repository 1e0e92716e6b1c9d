"""Job `headct report`: the closing results, every model side by side, from the evaluation stages' outputs.

Inputs (cfg paths): pre-training metrics (method, held-out pretext loss start/end), probe metrics
({model: {label: {auroc, auroc_low, auroc_high, n_pos, ...}}, "skipped": {label: reason}}) and predictions, and
optionally few-shot metrics (mean over labels per model and K), retrieval metrics (mAP per model and label) and
fine-tuning metrics, and the comparisons of `headct compare` ("Does pre-training help?"). Nothing is recomputed here except what the predictions CSV gives directly (calibration).
Outputs under cfg.report_dir: results.md, metrics.json, radar.png (probe AUROC per label, models overlaid),
fewshot.png, retrieval.png, calibration.png (the last three when their inputs exist).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headct.config.base import LABELS, JobContext
from headct.config.evaluate import ReportConfig
from headct.errors import InputError
from headct.eval import PROBE_META_KEYS

# Display names; any other model key (an external encoder) is shown as it is.
NAMES = {"pretrained": "pre-trained", "random_init": "random init", "hu_histogram": "HU histogram"}


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


def _optional(path: Path | None) -> dict[str, Any] | None:
    return _load(path, ()) if path is not None and path.is_file() else None


def _auroc_cell(m: dict[str, Any] | None, key: str = "auroc") -> str:
    """m[key] as "0.812 [0.700, 0.900]" with its `<key>_low/_high` CI, without it where absent, "-" if no value."""
    if not m or m.get(key) is None:
        return "-"
    if m.get(f"{key}_low") is None:
        return f"{m[key]:.3f}"
    return f"{m[key]:.3f} [{m[f'{key}_low']:.3f}, {m[f'{key}_high']:.3f}]"


def _canonical(labels: Any) -> list[str]:
    """Labels in vocabulary order (metrics JSON keys come sorted alphabetically); unknown names last."""
    order = {label: i for i, label in enumerate(LABELS)}
    return sorted(labels, key=lambda label: (order.get(label, len(order)), label))


def probe_models(probe: dict[str, Any]) -> list[str]:
    return [m for m, v in probe.items() if m not in PROBE_META_KEYS and isinstance(v, dict)]


def display(model: str, method: str) -> str:
    return f"pre-trained {method.upper()}".strip() if model == "pretrained" else NAMES.get(model, model)


def results_rows(probe: dict[str, Any]) -> list[list[str]]:
    """[label, test positives, AUROC [CI] per model] per probed label."""
    models = probe_models(probe)
    labels = _canonical({lab for m in models for lab in probe[m]})
    rows = []
    for label in labels:
        n_pos = next(probe[m][label]["n_pos"] for m in models if label in probe[m])
        rows.append([label, str(n_pos), *(_auroc_cell(probe[m].get(label)) for m in models)])
    return rows


def _mean_auroc(per_label: dict[str, Any]) -> float | None:
    values = [m["auroc"] for m in per_label.values()]
    return sum(values) / len(values) if values else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _ci_cell(entry: dict[str, Any], key: str) -> str:
    """`headct compare`'s {key, low, high} as "0.812 [0.700, 0.900]" (a difference signed)."""
    value = f"{entry[key]:+.3f}" if key == "diff" else f"{entry[key]:.3f}"
    return value if entry.get("low") is None else f"{value} [{entry['low']:.3f}, {entry['high']:.3f}]"


def compare_lines(compare: dict[str, Any] | None) -> list[str]:
    """The "Does pre-training help?" table from `headct compare`'s metrics.json: the primary label (and its
    severity strata) per setting; [] without it."""
    if not compare or not compare.get("results"):
        return []
    model, baseline, primary = compare["model"], compare.get("baseline"), compare["primary"]
    rows = []
    for setting in compare.get("settings", list(compare["results"])):
        entry = compare["results"][setting].get(primary)
        if not entry:
            continue
        for stratum, e in [("all", entry["all"]), *entry.get("strata", {}).items()]:
            if "aurocs" not in e:
                continue
            vs_r, vs_b = e.get("vs_random", {}), e.get("vs_baseline", {})
            gap = (e.get("gap_closure") or {}).get("value")
            rows.append([setting, stratum, f"{e['n_pos']}/{e['n_neg']}", _ci_cell(e["aurocs"][model], "auroc"),
                         f"{_ci_cell(vs_r['best_auroc'], 'auroc')} ({vs_r['best']})" if "best" in vs_r else "-",
                         ("yes" if vs_r["beats"] else "no") if "best" in vs_r else "-",
                         _ci_cell(vs_b, "diff") if "diff" in vs_b else "-",
                         f"{gap:.2f}" if gap is not None else "-"])
    if not rows:
        return []
    header = ["setting", "stratum", "test pos/neg", f"AUROC {model}", "best random init", "beats it (CIs apart)",
              f"{model} - {baseline}", "gap closed"]
    return ["", f"## Does pre-training help? ({primary}, test split)", "",
            "Best random init = the random-init seed with the highest test AUROC; differences are paired patient "
            "bootstraps (few-shot: seeds resampled too); details in reports/compare/comparison.md.", "",
            *_table(header, rows)]


def series_lines(probe: dict[str, Any], method: str) -> list[str]:
    """Per patient (primary) beside per series (FM-HCT's count) for every probed model and label; one line when
    every test patient has one series; [] for probe metrics without patient-level figures (older runs)."""
    models = probe_models(probe)
    entries = [(label, m, probe[m][label]) for label in _canonical({lab for m in models for lab in probe[m]})
               for m in models if {"auroc_patient", "n_patients"} <= set(probe[m].get(label, {}))]
    if not entries:
        return []

    def n_series(e: dict[str, Any]) -> int:  # older metrics lack n_series: every known-label test scan is one
        return e.get("n_series", e["n_pos"] + e["n_neg"])

    if all(n_series(e) == e["n_patients"] for _, _, e in entries):
        return ["", "Per patient = per series here: every test patient has one series, so the AUROCs above are "
                "per patient and per series alike (FM-HCT counted every series of a study: ingest with "
                "`--set ingest.keep=all` to compare)."]
    rows = [[label, display(m, method), _auroc_cell(e, "auroc_patient"), _auroc_cell(e),
             f"{e['n_patients']} / {n_series(e)}",
             f"{e.get('n_patients_pos', '-')} / {e.get('n_series_pos', e['n_pos'])}"]
            for label, m, e in entries]
    header = ["label", "model", "per patient AUROC", "per series AUROC", "test patients / series",
              "positive patients / series"]
    return ["", "## Per patient and per series (FM-HCT counted every series)", "",
            "Per patient (primary): one score per patient, the maximum over its series, against the patient's "
            "label. Per series (FM-HCT's way): every series a sample, its patient's label copied. Test AUROC "
            "[95% CI]; both CIs resample patients.", "", *_table(header, rows), "",
            "Per patient is primary because the series of one patient (thin, thick, bone, tilt-corrected) are "
            "correlated views of one examination: counting them as independent samples narrows CIs falsely (so "
            "both CIs here resample patients) and weights each patient by how many series it happened to keep."]


def answer_lines(compare: dict[str, Any] | None) -> list[str]:
    """The headline: the primary label per severity stratum for the pre-trained encoder, its best random-init twin,
    the HU histogram and the ceiling, and the sentence that says what it means ([] without compare's results)."""
    from headct.eval.verdict import headline_rows, headline_sentence

    if not compare or not compare.get("results"):
        return []
    header, rows = headline_rows(compare)
    if not rows:
        return []
    return ["", f"## The answer: does pre-training help detect {compare['primary']}?", "",
            headline_sentence(compare), "", "Test AUROC [95% CI, patient bootstrap]; a stratum is its positives "
            "against all negatives; best random init = the twin seed with the highest test AUROC.", "",
            *_table(header, rows)]


def render_markdown(pretrain: dict[str, Any] | None, probe: dict[str, Any], fewshot: dict[str, Any] | None,
                    retrieval: dict[str, Any] | None, finetune: dict[str, Any] | None, figures: list[str],
                    compare: dict[str, Any] | None = None) -> str:
    method = pretrain.get("method", "mae") if pretrain else ""
    models = probe_models(probe)
    lines = ["# Results", *answer_lines(compare), "", "## Linear probe (frozen features, test split)", "",
             "AUROC with 95% CIs from a patient-level bootstrap; C and thresholds chosen on val.", ""]
    lines += _table(["label", "test positives", *(f"AUROC {display(m, method)}" for m in models)],
                    results_rows(probe))
    lines += ["", "Mean AUROC over labels: " + ", ".join(
        f"{display(m, method)} {v:.3f}" for m in models if (v := _mean_auroc(probe[m])) is not None) + "."]
    for arm, choice in probe.get("selection", {}).get("arms", {}).items():
        if len(choice.get("val_auroc", {})) > 1:
            lines.append(f"- {display(arm, method)}: variant `{choice['chosen']}` chosen on val")
    lines += series_lines(probe, method)
    lines += compare_lines(compare)
    if probe.get("skipped"):
        lines += ["", "Skipped labels:", ""]
        lines += [f"- {label}: {probe['skipped'][label]}" for label in _canonical(probe["skipped"])]
    if fewshot and fewshot.get("mean_over_labels"):
        mean = fewshot["mean_over_labels"]
        ks = sorted({int(k) for by_k in mean.values() for k in by_k})
        lines += ["", "## Few-shot (K positives + K negatives per label, mean over labels; mean [min, max] over seeds)",
                  ""]
        rows = [[display(m, method), *(f"{by_k[str(k)]['auroc_mean']:.3f} [{by_k[str(k)]['auroc_min']:.3f}, "
                                       f"{by_k[str(k)]['auroc_max']:.3f}]" if str(k) in by_k else "-" for k in ks)]
                for m, by_k in mean.items()]
        lines += _table(["model", *(f"K={k}" for k in ks)], rows)
    if retrieval:
        rmodels = [m for m in retrieval if m not in ("skipped", "split") and isinstance(retrieval[m], dict)]
        labels = _canonical({lab for m in rmodels for lab in retrieval[m]})
        if labels:
            lines += ["", f"## Retrieval (cosine, {retrieval.get('split', 'test')} split, mAP per label)", ""]
            rows = [[lab, f"{next(retrieval[m][lab]['chance'] for m in rmodels if lab in retrieval[m]):.3f}",
                     *(f"{retrieval[m][lab]['map']:.3f}" if lab in retrieval[m] else "-" for m in rmodels)]
                    for lab in labels]
            lines += _table(["label", "chance", *(display(m, method) for m in rmodels)], rows)
    if finetune and finetune.get("labels"):
        lines += ["", f"## Fine-tuning ({finetune.get('model', 'pretrained')}, best epoch on val; test split)", ""]
        rows = [[lab, str(m.get("n_pos", "-")), _auroc_cell(m)] for lab, m in
                ((lab, finetune["labels"][lab]) for lab in _canonical(finetune["labels"]))]
        lines += _table(["label", "test positives", "AUROC [95% CI]"], rows)
    if pretrain:
        lines += ["", f"Held-out pretext loss ({method.upper()} pre-training): {pretrain['heldout_loss_start']:.4f} "
                  f"at start, {pretrain['heldout_loss_end']:.4f} at end."]
    lines += [""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def summary_metrics(pretrain: dict[str, Any] | None, probe: dict[str, Any], fewshot: dict[str, Any] | None,
                    retrieval: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        **({k: pretrain[k] for k in ("heldout_loss_start", "heldout_loss_end")} if pretrain else {}),
        "labels_probed": len(probe["pretrained"]),
        "labels_skipped": len(probe.get("skipped", {})),
    }
    for model in probe_models(probe):
        out[f"mean_auroc_{model}"] = _mean_auroc(probe[model])
    for model, by_k in (fewshot or {}).get("mean_over_labels", {}).items():
        for k, entry in by_k.items():
            out[f"fewshot_auroc_{model}_k{k}"] = entry["auroc_mean"]
    for model, per_label in (retrieval or {}).items():
        if model not in ("skipped", "split") and isinstance(per_label, dict) and per_label:
            out[f"retrieval_map_{model}"] = sum(r["map"] for r in per_label.values()) / len(per_label)
    return out


def _figures(cfg: ReportConfig, probe: dict[str, Any], fewshot: dict[str, Any] | None,
             retrieval: dict[str, Any] | None, method: str) -> list[Path]:
    from headct.eval.plots import plot_fewshot_curves, plot_radar, plot_reliability_grid, plot_retrieval_bars

    out = [plot_radar({display(m, method): {lab: r["auroc"] for lab, r in probe[m].items()}
                       for m in probe_models(probe)}, cfg.report_dir / "radar.png",
                      "linear probe test AUROC per label")]
    if fewshot and fewshot.get("mean_over_labels"):
        panel = {display(m, method): {int(k): (e["auroc_mean"], e["auroc_min"], e["auroc_max"])
                                      for k, e in by_k.items()} for m, by_k in fewshot["mean_over_labels"].items()}
        out.append(plot_fewshot_curves({"mean over labels": panel}, cfg.report_dir / "fewshot.png"))
    if retrieval:
        rmodels = [m for m in retrieval if m not in ("skipped", "split") and isinstance(retrieval[m], dict)]
        labels = _canonical({lab for m in rmodels for lab in retrieval[m]})
        chance = {lab: next(retrieval[m][lab]["chance"] for m in rmodels if lab in retrieval[m]) for lab in labels}
        out.append(plot_retrieval_bars({display(m, method): {lab: r["map"] for lab, r in retrieval[m].items()}
                                        for m in rmodels}, chance, cfg.report_dir / "retrieval.png"))
    if cfg.probe_predictions is not None and cfg.probe_predictions.is_file():
        import pandas as pd

        table = pd.read_csv(cfg.probe_predictions)
        test = table[table["split"] == "test"]
        # Pooled over labels: one reliability curve per model (per-label panels are in reports/probe/).
        pooled = {"all labels": {display(m, method): (g["target"].to_numpy(), g["score"].to_numpy())
                                 for m, g in test.groupby("model", sort=False)}}
        out.append(plot_reliability_grid(pooled, cfg.report_dir / "calibration.png",
                                         "linear probe calibration (test, pooled over labels)"))
    return out


def run(cfg: ReportConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.io import write_json, write_text

    pretrain = (None if cfg.pretrain_metrics is None
                else _load(cfg.pretrain_metrics, ("heldout_loss_start", "heldout_loss_end")))
    probe = _load(cfg.probe_metrics, ("pretrained", "random_init"))
    fewshot, retrieval = _optional(cfg.fewshot_metrics), _optional(cfg.retrieval_metrics)
    finetune, compare = _optional(cfg.finetune_metrics), _optional(cfg.compare_metrics)
    method = pretrain.get("method", "mae") if pretrain else ""
    figures = _figures(cfg, probe, fewshot, retrieval, method)
    markdown = render_markdown(pretrain, probe, fewshot, retrieval, finetune, [str(f) for f in figures], compare)
    summary = summary_metrics(pretrain, probe, fewshot, retrieval)
    write_text(cfg.report_dir / "results.md", markdown)
    write_json(cfg.report_dir / "metrics.json", summary)

    with tracking.job_run(ctx.tracking, "report", cfg, ctx.root) as mlrun:
        mlrun.log_metrics({k: v for k, v in summary.items() if v is not None})
        for path in (cfg.report_dir / "results.md", *figures):
            mlrun.log_artifact(path, "report")

    models = probe_models(probe)
    table = Table(title="results: linear probe, test AUROC [95% CI]")
    for name in ["label", "test positives", *(display(m, method) for m in models)]:
        table.add_column(name, justify="left" if name == "label" else "right")
    for row in results_rows(probe):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if compare and compare.get("results"):
        from headct.eval.verdict import headline_sentence

        console.print(headline_sentence(compare))
    for label in _canonical(probe.get("skipped", {})):
        console.print(f"skipped {label}: {probe['skipped'][label]}")
    if pretrain:
        console.print(f"held-out pretext loss: {summary['heldout_loss_start']:.4f} -> {summary['heldout_loss_end']:.4f}")
    for path in figures:
        console.print(f"wrote {path}")
    return summary
