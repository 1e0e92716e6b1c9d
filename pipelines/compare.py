"""Job `headct compare`: does pre-training help? Comparisons on the probe's and few-shot's test predictions.

Recipe: read the predictions CSVs (probe: mode `linear_probe`; few-shot: mode `fewshot` at each K of
`compare.shots`), keep the test rows; per setting and per label (the primary label, then the pre-declared
`compare.labels`): the model (`pretrained`) against the best random-init arm (non-overlapping 95% CIs, and the paired
difference), against the baseline (`hu_histogram`: paired bootstrap CI of the AUROC difference), and the share of
the random-init-to-ceiling gap it closes when a ceiling is given; the same per severity stratum (its positives
against all negatives) for `compare.stratum_labels` when the store behind `compare.splits` has a `meta.csv` with
`compare.stratum_column`. Method: headct/eval/compare.py (patient bootstrap, seeds resampled in few-shot).
With `compare.finetune_predictions` (arm name -> a `headct finetune` predictions CSV), the setting `finetune` compares the
fine-tuned arms the same way, and asks whether the pre-trained arm is at least as good as the best random-init arm
(paired lower bound of the difference >= -`compare.noninferiority_margin`).
Outputs under cfg.report_dir: metrics.json, comparison.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headct.config.base import JobContext
from headct.config.evaluate import CompareConfig
from headct.errors import InputError

RANDOM_INIT_ARM = r"^random_init(\.s\d+)?$"  # `random_init` and `random_init.s<seed>` (extract.random_init_seeds)
COLUMNS = ("scan_id", "patient_id", "split", "label", "model", "mode", "k", "seed", "score", "target")


def _read_predictions(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first, or unset it in compare)")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable predictions CSV ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} of the predictions contract")
    table["model"] = table["model"].astype(str)
    return table[table["split"] == "test"]


def _shown(path: Path, root: Path) -> str:
    """A path as reports show it: relative to the project root when under it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _settings(cfg: CompareConfig, root: Path) -> tuple[dict[str, tuple[Any, str]], dict[str, str]]:
    """setting name -> (its test rows, the file), and the settings that cannot be compared, with the reason."""
    settings: dict[str, tuple[Any, str]] = {}
    skipped: dict[str, str] = {}
    if cfg.probe_predictions is not None:
        table = _read_predictions(cfg.probe_predictions)
        settings["probe"] = (table[table["mode"] == "linear_probe"], _shown(cfg.probe_predictions, root))
    if cfg.fewshot_predictions is not None:
        table = _read_predictions(cfg.fewshot_predictions)
        table, shown = table[table["mode"] == "fewshot"], _shown(cfg.fewshot_predictions, root)
        for k in cfg.shots:
            rows = table[table["k"] == k]
            if rows.empty:
                skipped[f"fewshot_k{k}"] = f"{shown}: no few-shot predictions at K={k}"
            else:
                settings[f"fewshot_k{k}"] = (rows, shown)
    if cfg.finetune_predictions:
        settings["finetune"] = (_finetuned_arms(cfg.finetune_predictions), "compare.finetune_predictions")
    return settings, skipped


def _finetuned_arms(files: dict[str, Path]) -> Any:
    """The fine-tuned arms' test rows, one table: each file's single model renamed to its arm, and no seed (each
    arm is one run; arms trained with different seeds are still scored on the same scans, which is the pairing)."""
    import pandas as pd

    parts = []
    for arm, path in files.items():
        table = _read_predictions(path)
        models = sorted(set(table["model"]))
        if len(models) != 1:
            raise InputError(f"{path}: a fine-tuned arm's predictions hold one model, found {models or 'none'} "
                             f"(compare.finetune_predictions.{arm})")
        parts.append(table.assign(model=arm, seed=pd.NA))
    return pd.concat(parts, ignore_index=True)


def _strata_table(cfg: CompareConfig, ctx: JobContext) -> tuple[Any, str | None]:
    """(<store>/meta.csv, None) when it exists and has the stratum column, else (None, why not)."""
    import pandas as pd

    from headct.data.splits import store_of_split

    store = store_of_split(cfg.splits, ctx.root)
    meta = store / "meta.csv" if store is not None else None
    if meta is None or not meta.is_file():
        return None, f"no meta.csv in the store behind {_shown(cfg.splits, ctx.root)}"
    try:
        table = pd.read_csv(meta, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta}: not a readable CSV ({exc})") from None
    if cfg.stratum_column not in table.columns:
        return None, f"{meta.name} has no column {cfg.stratum_column!r} (compare.stratum_column)"
    if not {"scan_id", "patient_id"} & set(table.columns):
        raise InputError(f"{meta}: needs a scan_id or patient_id column to key the strata")
    return table, None


def _ceiling(cfg: CompareConfig, labels: list[str], meta: Any) -> dict[str, dict[str, float | None]]:
    """label -> {"all": AUROC, stratum: AUROC, ...} of the ceiling (strata only from its predictions)."""
    import json

    from headct.eval.compare import ceiling_from_metrics, mean_auroc, strata_of, stratum_rows

    if cfg.ceiling_metrics is not None:
        path = cfg.ceiling_metrics
        try:
            table = ceiling_from_metrics(json.loads(path.read_text()))
        except FileNotFoundError:
            raise InputError(f"{path}: file not found (compare.ceiling_metrics)") from None
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from None
        return {label: {"all": table[label]} for label in labels if label in table}
    if cfg.ceiling_predictions is None:
        return {}
    rows = _read_predictions(cfg.ceiling_predictions)
    models = sorted(set(rows["model"]))
    model = cfg.ceiling_model or (models[0] if len(models) == 1 else None)
    if model is None or model not in models:
        raise InputError(f"{cfg.ceiling_predictions}: models {models}; name the ceiling in compare.ceiling_model")
    rows = rows[rows["model"] == model]
    out: dict[str, dict[str, float | None]] = {}
    for label in labels:
        part = rows[rows["label"] == label]
        if part.empty:
            continue
        out[label] = {"all": mean_auroc(part)}
        if meta is not None and label in cfg.stratum_labels:
            strata = strata_of(part, meta, cfg.stratum_column)
            for stratum in {s for s in strata if s is not None}:
                out[label][stratum] = mean_auroc(stratum_rows(part, strata, stratum))
    return out


def _compare_label(cfg: CompareConfig, rows: Any, label: str, meta: Any,
                   ceiling: dict[str, float | None]) -> dict[str, Any]:
    import re

    from headct.eval.compare import compare_rows, strata_of, stratum_order, stratum_rows

    models = list(dict.fromkeys(rows["model"]))
    randoms = cfg.random_init or [m for m in models if re.match(RANDOM_INIT_ARM, m)]

    def one(part: Any, ceiling_auc: float | None) -> dict[str, Any]:
        try:
            return compare_rows(part, cfg.model, randoms, cfg.baseline, ceiling_auc, cfg.bootstrap, cfg.seed)
        except ValueError as exc:
            raise InputError(f"{label}: {exc}") from None

    out: dict[str, Any] = {"all": one(rows, ceiling.get("all"))}
    if meta is not None and label in cfg.stratum_labels:
        strata = strata_of(rows, meta, cfg.stratum_column)
        out["strata"] = {s: one(stratum_rows(rows, strata, s), ceiling.get(s))
                         for s in stratum_order([s for s in strata if s is not None])}
        out["unstratified_positive_rows"] = int(((rows["target"] == 1) & strata.isna()).sum())
    return out


def _summary(cfg: CompareConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per setting: the primary label's answers, and which secondary labels the model beats random init on."""
    out: dict[str, Any] = {}
    for setting, by_label in results.items():  # a dict keeps insertion order; the JSON file does not
        primary = by_label.get(cfg.primary, {}).get("all", {})
        out[setting] = {
            "primary_beats_random": primary.get("vs_random", {}).get("beats"),
            "primary_beats_baseline": primary.get("vs_baseline", {}).get("above_zero"),
            "primary_gap_closure": (primary.get("gap_closure") or {}).get("value"),
            "labels_beating_random": [label for label in cfg.labels if label != cfg.primary
                                      and by_label.get(label, {}).get("all", {}).get("vs_random", {}).get("beats")],
        }
        if setting == "finetune":  # fine-tuned from pre-training at least as good as from random init?
            paired = primary.get("vs_random", {}).get("paired") or {}
            low = paired.get("low")
            out[setting]["primary_at_least_as_good"] = None if low is None else low >= -cfg.noninferiority_margin
            out[setting]["primary_diff_vs_random"] = {k: paired[k] for k in ("diff", "low", "high") if k in paired}
    return out


def _ci(entry: dict[str, Any] | None, key: str = "auroc") -> str:
    if not entry:
        return "-"
    value = f"{entry[key]:+.3f}" if key == "diff" else f"{entry[key]:.3f}"
    return value if entry.get("low") is None else f"{value} [{entry['low']:.3f}, {entry['high']:.3f}]"


def table_rows(cfg: CompareConfig, by_label: dict[str, Any]) -> list[list[str]]:
    """[label, stratum, test pos/neg, model AUROC, best random init, beats?, diff vs baseline, gap closure]."""
    rows = []
    for label, entry in by_label.items():
        parts = [("all", entry["all"]), *entry.get("strata", {}).items()]
        for stratum, e in parts:
            if "skipped" in e:
                rows.append([label, stratum, "-", f"skipped: {e['skipped']}", "", "", "", ""])
                continue
            vs_r, vs_b = e.get("vs_random", {}), e.get("vs_baseline", {})
            best = f"{_ci(vs_r.get('best_auroc'))} ({vs_r['best']})" if "best" in vs_r else "-"
            beats = "-" if "best" not in vs_r else "yes" if vs_r["beats"] else "no"
            gap = (e.get("gap_closure") or {}).get("value")
            rows.append([label, stratum, f"{e['n_pos']}/{e['n_neg']}", _ci(e["aurocs"][cfg.model]), best, beats,
                         _ci(vs_b, "diff") if "diff" in vs_b else "-", f"{gap:.2f}" if gap is not None else "-"])
    return rows


HEADER = ["label", "stratum", "test pos/neg", "AUROC {model}", "best random init", "beats it (CIs apart)",
          "{model} - {baseline} [paired CI]", "gap closed"]


def render_markdown(cfg: CompareConfig, metrics: dict[str, Any]) -> str:
    header = [h.format(model=cfg.model, baseline=cfg.baseline or "baseline") for h in HEADER]
    lines = ["# Does pre-training help?", "",
             f"Test AUROC [95% CI]: patient bootstrap ({cfg.bootstrap} resamples), few-shot seeds resampled too; "
             f"`{cfg.model}` against the best random-init arm (highest test AUROC) with non-overlapping CIs, and "
             f"against `{cfg.baseline}` by the paired CI of the difference. A severity stratum is its positives "
             "against all negatives. Method: headct/eval/compare.py.", ""]
    for setting in metrics["settings"]:
        by_label = metrics["results"][setting]
        rows = table_rows(cfg, by_label)
        lines += [f"## {setting}", ""]
        if rows:
            lines += ["| " + " | ".join(header) + " |",
                      "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)]
        else:
            lines.append("No label could be compared in this setting (see skipped below).")
        summary = metrics["summary"][setting]
        s = {k: "n/a" if v is None else ("yes" if v else "no") if isinstance(v, bool) else
             f"{v:.2f}" if isinstance(v, float) else v for k, v in summary.items()}
        lines += ["", f"{cfg.primary}: beats the best random init: {s['primary_beats_random']}; beats "
                  f"{cfg.baseline}: {s['primary_beats_baseline']}; gap closed: {s['primary_gap_closure']}. "
                  f"Declared labels beating random init: {len(s['labels_beating_random'])} of "
                  f"{len([x for x in cfg.labels if x != cfg.primary])} ({', '.join(s['labels_beating_random']) or '-'})."
                  + (f" At least as good as the best random init (paired difference "
                     f"{_ci(summary.get('primary_diff_vs_random'), 'diff')}, lower bound >= "
                     f"-{cfg.noninferiority_margin}): {s['primary_at_least_as_good']}."
                     if "primary_at_least_as_good" in s else ""),
                  ""]
    for name, reason in metrics["skipped"].items():
        lines.append(f"- skipped {name}: {reason}")
    return "\n".join(lines).rstrip() + "\n"


def run(cfg: CompareConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.headline import write_stage_headline
    from headct.io import write_json, write_text

    labels = list(dict.fromkeys([cfg.primary, *cfg.labels]))
    settings, skipped = _settings(cfg, ctx.root)
    meta, no_strata = _strata_table(cfg, ctx)
    if no_strata is not None:
        skipped["strata"] = no_strata
    ceiling = _ceiling(cfg, labels, meta)
    results: dict[str, dict[str, Any]] = {}
    for setting, (rows, path) in settings.items():
        results[setting] = {}
        for label in labels:
            part = rows[rows["label"] == label]
            if part.empty:
                skipped[f"{setting}/{label}"] = f"{path}: no test predictions for {label}"
                continue
            try:
                results[setting][label] = _compare_label(cfg, part, label, meta, ceiling.get(label, {}))
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
    # JSON keys are written sorted: "settings" keeps the order (probe, then K ascending).
    metrics = {"model": cfg.model, "baseline": cfg.baseline, "primary": cfg.primary, "labels": labels,
               "settings": list(results),
               "ceiling": ceiling, "results": results, "summary": _summary(cfg, results), "skipped": skipped}
    write_json(cfg.report_dir / "metrics.json", metrics)
    write_stage_headline(cfg.report_dir, "compare", metrics)  # the DVC metric: a few numbers of it
    write_text(cfg.report_dir / "comparison.md", render_markdown(cfg, metrics))

    with tracking.job_run(ctx.tracking, "compare", cfg, ctx.root) as mlrun:
        flat = {}
        for setting, by_label in results.items():
            for label, entry in by_label.items():
                e = entry["all"]
                if "aurocs" in e:
                    flat[f"{setting}.{label}.auroc"] = e["aurocs"][cfg.model]["auroc"]
                if "diff" in e.get("vs_baseline", {}):
                    flat[f"{setting}.{label}.diff_vs_baseline"] = e["vs_baseline"]["diff"]
                if "beats" in e.get("vs_random", {}):
                    flat[f"{setting}.{label}.beats_random"] = float(e["vs_random"]["beats"])
        mlrun.log_metrics(flat)
        for name in ("metrics.json", "comparison.md"):
            mlrun.log_artifact(cfg.report_dir / name, "compare")

    console = Console()
    header = [h.format(model=cfg.model, baseline=cfg.baseline or "baseline") for h in HEADER]
    for setting, by_label in results.items():
        if not by_label:
            console.print(f"{setting}: no label could be compared")
            continue
        table = Table(title=f"does pre-training help? {setting} (test AUROC [95% CI])")
        for name in header:
            table.add_column(name, justify="left" if name in ("label", "stratum") else "right")
        for row in table_rows(cfg, by_label):
            table.add_row(*row)
        console.print(table)
    for name, reason in skipped.items():
        console.print(f"skipped {name}: {reason}")
    return {"settings": list(results), "summary": metrics["summary"]}
