"""headline.json: the few numbers per stage that DVC declares as metrics (headct/headline.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from headct.headline import (
    ARMS_NOT_SHOWN,
    BUDGET,
    HEADLINES,
    MAX_VALUES,
    HeadlineError,
    count_values,
    fewshot_headline,
    probe_headline,
    write_headline,
    write_stage_headline,
)

REPO = Path(__file__).resolve().parent.parent


def probe_metrics(arms: list[str]) -> dict:
    def label(auroc: float) -> dict:
        return {"auroc": auroc, "auroc_low": auroc - 0.1, "auroc_high": auroc + 0.1, "ap": 0.5,
                "subgroups": {"kernel": {"H30s": {"n_pos": 1}}}}

    return {**{a: {"ICH": label(0.7), "SDH": label(0.5)} for a in arms}, "skipped": {"Tumor": "too few"}}


def test_budgets_fit_one_terminal_and_every_headlined_stage_declares_it_in_dvc_yaml() -> None:
    import yaml

    assert sum(BUDGET.values()) <= MAX_VALUES
    assert set(HEADLINES) == set(BUDGET)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        assert all(m.endswith("/headline.json") for m in metrics), (name, metrics)
        if name in BUDGET:
            assert metrics == [f"reports/{name}/headline.json"], name
        if f"reports/{name}/metrics.json" in outs + metrics:  # the full record stays an output, never a metric
            assert f"reports/{name}/metrics.json" in outs, name


def test_probe_headline_is_mean_auroc_and_ich_with_ci_and_leaves_metrics_untouched(tmp_path: Path) -> None:
    metrics = probe_metrics(["hu_histogram", "pretrained", "random_init"])
    before = copy.deepcopy(metrics)
    path = write_stage_headline(tmp_path, "probe", metrics)
    assert metrics == before
    head = json.loads(path.read_text())
    assert set(head) == {"pretrained", "random_init", "hu_histogram"}
    assert head["pretrained"] == {"mean_auroc": 0.6, "ICH": {"auroc": 0.7, "low": 0.6, "high": 0.8}}
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temp file left


def test_too_many_arms_are_cut_to_the_budget_and_counted() -> None:
    arms = ["pretrained", *[f"random_init_s{i}" for i in range(10)], "hu_histogram", "ext_a"]
    head = probe_headline(probe_metrics(arms))
    assert count_values(head) <= BUDGET["probe"]
    shown = [a for a in head if a != ARMS_NOT_SHOWN]
    assert shown[0] == "pretrained" and head[ARMS_NOT_SHOWN] == len(arms) - len(shown) > 0
    few = {"mean_over_labels": {a: {str(k): {"auroc_mean": 0.5} for k in (1, 2, 4, 8, 16)} for a in arms}}
    head = fewshot_headline(few)
    assert count_values(head) <= BUDGET["fewshot"] and head[ARMS_NOT_SHOWN] > 0
    assert head["pretrained"] == {"K1": 0.5, "K2": 0.5, "K4": 0.5, "K8": 0.5, "K16": 0.5}


def test_write_headline_refuses_over_budget_text_and_unknown_stages(tmp_path: Path) -> None:
    with pytest.raises(HeadlineError, match="pretrain headline has 5 values, its budget is 4"):
        write_headline(tmp_path, "pretrain", {f"v{i}": i for i in range(5)})
    with pytest.raises(HeadlineError, match="only numbers"):
        write_headline(tmp_path, "pretrain", {"method": "mae"})
    with pytest.raises(HeadlineError, match="no headline budget"):
        write_headline(tmp_path, "report", {"x": 1})
    assert not (tmp_path / "headline.json").exists()


def test_missing_primary_label_and_nan_are_left_out_or_null(tmp_path: Path) -> None:
    metrics = {"labels": {"SDH": {"auroc": 0.8, "auroc_low": float("nan"), "auroc_high": 0.9}},
               "best_val_auroc_mean": 0.75}
    head = json.loads(write_stage_headline(tmp_path, "finetune", metrics).read_text())
    assert head == {"mean_auroc": 0.8, "best_val_auroc_mean": 0.75}
    ingest = {"accepted": 3, "rejected": {"localizer": 2, "not_selected": 1}, "studies_seen": 4,
              "series_seen": 6, "duplicates": 0}
    assert HEADLINES["ingest"](ingest)["rejected"] == 3
