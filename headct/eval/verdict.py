"""The answer the demo and the report lead with: does the pre-trained encoder detect the primary finding (ICH)
better than its random-init twin and the HU histogram, and how close is it to the supervised ceiling?

Built from `headct compare`'s metrics.json only (nothing recomputed): one row per severity stratum ("all" first),
test AUROC [95% CI] of the pre-trained encoder, its best random-init twin and the histogram, in the linear probe
and at the largest few-shot K compared, and the ceiling's AUROC; then one sentence that says what the CIs allow
one to conclude. The sentence is derived from the verdicts (`vs_random.beats`: CIs apart; `vs_baseline.above_zero`:
the paired difference's CI above 0), never written by hand.
"""

from __future__ import annotations

from typing import Any


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("auroc") is None:
        return "-"
    if entry.get("low") is None:
        return f"{entry['auroc']:.3f}"
    return f"{entry['auroc']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _fewshot_setting(compare: dict[str, Any]) -> str | None:
    """The few-shot setting with the largest K that has results (e.g. "fewshot_k16")."""
    shots = [s for s in compare.get("results", {}) if s.startswith("fewshot_k") and s[9:].isdigit()]
    return max(shots, key=lambda s: int(s[9:])) if shots else None


def _strata(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("all", ...) then the strata by severity ("<5mL", "5-30mL", ">30mL"; metrics.json stores keys sorted)."""
    from headct.eval.compare import stratum_order

    strata = entry.get("strata", {})
    return [("all", entry["all"]), *((s, strata[s]) for s in stratum_order(list(strata)))]


def headline_rows(compare: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the primary label's table; ([], []) when compare has no probe result for it."""
    primary, model, baseline = compare["primary"], compare["model"], compare.get("baseline")
    probe = compare.get("results", {}).get("probe", {}).get(primary)
    if not probe or "aurocs" not in probe["all"]:
        return [], []
    few_setting = _fewshot_setting(compare)
    few = compare["results"].get(few_setting, {}).get(primary) if few_setting else None
    ceiling = (compare.get("ceiling") or {}).get(primary) or {}
    k = few_setting[9:] if few_setting else None
    header = ["stratum", "test pos/neg", f"probe: {model}", "probe: best random init", f"probe: {baseline}"]
    if few:
        header += [f"K={k}: {model}", f"K={k}: best random init"]
    header.append("ceiling")
    few_strata = dict(_strata(few)) if few else {}
    rows = []
    for stratum, e in _strata(probe):
        if "aurocs" not in e:
            continue
        best = e.get("vs_random", {}).get("best")
        row = [stratum, f"{e['n_pos']}/{e['n_neg']}", _cell(e["aurocs"].get(model)),
               _cell(e["aurocs"].get(best)) if best else "-", _cell(e["aurocs"].get(baseline))]
        if few:
            f = few_strata.get(stratum, {})
            fbest = f.get("vs_random", {}).get("best")
            row += [_cell(f.get("aurocs", {}).get(model)), _cell(f.get("aurocs", {}).get(fbest)) if fbest else "-"]
        value = ceiling.get(stratum)
        row.append(f"{value:.3f}" if isinstance(value, int | float) else "-")
        rows.append(row)
    return header, rows


def headline_sentence(compare: dict[str, Any]) -> str:
    """What the primary label's CIs allow one to say, from the probe and the largest few-shot K."""
    primary = compare["primary"]
    parts = []
    settings = ["probe"] + ([s] if (s := _fewshot_setting(compare)) else [])
    for setting in settings:
        entry = compare["results"].get(setting, {}).get(primary, {}).get("all", {})
        if "aurocs" not in entry:
            continue
        name = "the linear probe" if setting == "probe" else f"few-shot K={setting[9:]}"
        vs_r, vs_b = entry.get("vs_random", {}), entry.get("vs_baseline", {})
        if vs_r.get("beats"):
            against_random = "beats its best random-init twin (95% CIs apart)"
        elif vs_r.get("paired", {}).get("above_zero"):
            against_random = ("is above its best random-init twin by the paired CI, but the two CIs overlap (not the "
                              "benchmark's bar)")
        else:
            against_random = "is not distinguishable from its best random-init twin"
        against_baseline = ("above the HU histogram (paired CI of the difference above 0)" if vs_b.get("above_zero")
                            else "not above the HU histogram")
        parts.append(f"in {name} the pre-trained encoder {against_random} and is {against_baseline}")
    if not parts:
        return f"No comparison for {primary} (see reports/compare/comparison.md)."
    ceiling = (compare.get("ceiling") or {}).get(primary, {}).get("all")
    probe = compare["results"].get("probe", {}).get(primary, {}).get("all", {}).get("aurocs", {})
    pretrained = (probe.get(compare.get("model", "pretrained")) or {}).get("auroc")
    tail = ""
    if isinstance(ceiling, int | float):
        tail = f"; the supervised ceiling (a model from scratch on the labels of train + pool) reaches {ceiling:.3f}"
        if isinstance(pretrained, int | float) and ceiling < pretrained:
            tail += (", below the pre-trained probe: with this few labels it did not learn what the data allows, so "
                     "it bounds nothing here")
    return f"{primary}, test split: " + "; ".join(parts) + tail + "."
