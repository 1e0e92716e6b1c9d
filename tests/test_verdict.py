"""The report's headline (headct/eval/verdict.py): the table and the sentence follow compare's verdicts."""

from __future__ import annotations

import copy
from typing import Any

from headct.eval.verdict import headline_rows, headline_sentence


def _auroc(value: float, low: float, high: float) -> dict[str, float]:
    return {"auroc": value, "low": low, "high": high}


def _entry(pre: float, rand: float, hist: float, beats: bool, paired_above: bool, above_hist: bool,
           n_pos: int = 30) -> dict[str, Any]:
    return {"aurocs": {"pretrained": _auroc(pre, pre - 0.05, pre + 0.05),
                       "random_init.s3": _auroc(rand, rand - 0.05, rand + 0.05),
                       "hu_histogram": _auroc(hist, hist - 0.05, hist + 0.05)},
            "n_pos": n_pos, "n_neg": 100,
            "vs_random": {"best": "random_init.s3", "beats": beats, "paired": {"above_zero": paired_above},
                          "best_auroc": _auroc(rand, rand - 0.05, rand + 0.05)},
            "vs_baseline": {"above_zero": above_hist, "diff": pre - hist, "low": 0.01, "high": 0.2}}


COMPARE: dict[str, Any] = {
    "model": "pretrained", "baseline": "hu_histogram", "primary": "ICH",
    "ceiling": {"ICH": {"all": 0.93, "<5mL": 0.71, "5-30mL": 0.95}},
    "results": {
        "probe": {"ICH": {"all": _entry(0.88, 0.61, 0.75, True, True, True),
                          "strata": {"5-30mL": _entry(0.91, 0.62, 0.80, True, True, True, n_pos=14),
                                     "<5mL": _entry(0.60, 0.55, 0.52, False, False, False, n_pos=8)}}},
        "fewshot_k8": {"ICH": {"all": _entry(0.70, 0.60, 0.72, False, False, False)}},
        "fewshot_k16": {"ICH": {"all": _entry(0.80, 0.62, 0.74, False, True, False)}},
    },
}


def test_rows_cover_every_stratum_with_each_arm_and_the_ceiling() -> None:
    header, rows = headline_rows(COMPARE)
    assert header == ["stratum", "test pos/neg", "probe: pretrained", "probe: best random init",
                      "probe: hu_histogram", "K=16: pretrained", "K=16: best random init", "ceiling"]
    assert [r[0] for r in rows] == ["all", "<5mL", "5-30mL"]  # by severity, whatever the JSON's key order
    assert rows[0][1:] == ["30/100", "0.880 [0.830, 0.930]", "0.610 [0.560, 0.660]", "0.750 [0.700, 0.800]",
                           "0.800 [0.750, 0.850]", "0.620 [0.570, 0.670]", "0.930"]
    assert rows[1][-3:] == ["-", "-", "0.710"]  # few-shot has no strata here: shown as missing, never invented


def test_the_sentence_says_what_the_cis_allow() -> None:
    sentence = headline_sentence(COMPARE)
    assert "in the linear probe the pre-trained encoder beats its best random-init twin (95% CIs apart) and is " \
           "above the HU histogram" in sentence
    assert "few-shot K=16 the pre-trained encoder is above its best random-init twin by the paired CI, but the " \
           "two CIs overlap" in sentence and "not above the HU histogram" in sentence
    assert sentence.endswith("the supervised ceiling (a model from scratch on the labels of train + pool) reaches "
                             "0.930.")
    weak = copy.deepcopy(COMPARE)  # a ceiling below the probe (the demo's 260 labels): said, not passed off as one
    weak["ceiling"]["ICH"]["all"] = 0.44
    assert headline_sentence(weak).endswith("reaches 0.440, below the pre-trained probe: with this few labels it did "
                                            "not learn what the data allows, so it bounds nothing here.")
    worse = copy.deepcopy(COMPARE)
    worse["results"]["probe"]["ICH"]["all"] = _entry(0.55, 0.60, 0.75, False, False, False)
    flipped = headline_sentence(worse)
    assert "in the linear probe the pre-trained encoder is not distinguishable from its best random-init twin " \
           "and is not above the HU histogram" in flipped


def test_nothing_to_say_without_a_probe_result() -> None:
    empty = {**COMPARE, "results": {"probe": {}}}
    assert headline_rows(empty) == ([], [])
    assert headline_sentence(empty) == "No comparison for ICH (see reports/compare/comparison.md)."
