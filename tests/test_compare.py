"""Comparisons of models on test predictions (headct/eval/compare.py) on constructed predictions whose answer is
known, and the `headct compare` job on predictions CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.errors import InputError
from headct.eval import PREDICTION_COLUMNS
from headct.eval.compare import (
    Paired,
    bootstrap_aurocs,
    compare_rows,
    gap_closure,
    model_auroc,
    paired_difference,
    paired_scores,
    strata_of,
    stratum_order,
    stratum_rows,
    versus_best,
)


def rows_of(scores: dict[str, np.ndarray], y: np.ndarray, patients: np.ndarray | None = None, label: str = "ICH",
            mode: str = "linear_probe", k: int | str = "", scans: np.ndarray | None = None) -> pd.DataFrame:
    """Prediction rows: scores[model] is (S, n) (one row per seed) or (n,) (one seed, 0)."""
    n = len(y)
    scans = np.array([f"ser_{i:04d}" for i in range(n)]) if scans is None else scans
    patients = scans if patients is None else patients
    frames = []
    for model, s in scores.items():
        s = np.atleast_2d(s)
        for seed, row in enumerate(s):
            frames.append(pd.DataFrame({
                "scan_id": scans, "patient_id": patients, "split": "test", "label": label, "model": model,
                "mode": mode, "k": k, "seed": seed, "score": row, "target": y, "threshold": 0.5}))
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]


def test_identical_models_differ_by_zero_and_a_perfect_model_beats_chance() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    noise = rng.random(80)
    rows = rows_of({"a": noise, "b": noise.copy(), "perfect": y + 0.1 * noise}, y)
    boot = bootstrap_aurocs(paired_scores(rows, ["a", "b", "perfect"]), 500, seed=0)
    same = paired_difference(boot, "a", "b")
    assert same["diff"] == 0 and same["low"] <= 0 <= same["high"] and not same["above_zero"]
    better = paired_difference(boot, "perfect", "a")
    assert better["low"] > 0 and better["above_zero"] and boot.point["perfect"] == 1.0
    vs = versus_best(boot, "perfect", ["a", "b"])
    assert vs["beats"] and vs["non_overlapping"] and vs["best"] == "a"  # a tie goes to the first listed
    assert not versus_best(boot, "a", ["b"])["non_overlapping"]


def test_best_random_init_is_the_highest_test_auroc() -> None:
    y = np.repeat([0, 1], 30)
    base = np.linspace(0, 1, 60)
    weak, strong = np.where(y == 1, base, base[::-1]), y * 0.3 + base
    boot = bootstrap_aurocs(paired_scores(rows_of({"m": strong, "r0": weak, "r1": strong}, y), ["m", "r0", "r1"]),
                            200)
    vs = versus_best(boot, "m", ["r0", "r1"])
    assert vs["best"] == "r1" and vs["others"]["r0"] < vs["others"]["r1"] and not vs["beats"]


def test_duplicating_a_patients_rows_does_not_narrow_the_interval() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 25)
    score = y * 0.4 + rng.random(50)
    once = paired_scores(rows_of({"m": score}, y), ["m"])
    scans = np.array([f"ser_{i:04d}" for i in range(100)])
    patients = np.array([f"pat_{i % 50:04d}" for i in range(100)])  # each patient now has two scans
    twice_rows = rows_of({"m": np.tile(score, 2)}, np.tile(y, 2), patients, scans=scans)
    twice = paired_scores(twice_rows, ["m"])
    width = {"once": _width(once), "twice": _width(twice)}
    assert width["twice"] >= width["once"] - 1e-12
    # The same data resampled by scan (each scan its own patient) would look twice as certain: this test can fail.
    by_scan = Paired(twice.y, twice.groups.copy(), twice.scores, twice.seeds)
    by_scan.groups = np.array([f"scan_{i}" for i in range(100)])
    assert _width(by_scan) < 0.85 * width["once"]


def _width(paired: Paired) -> float:
    result = model_auroc(bootstrap_aurocs(paired, 400, seed=3), "m")
    return result["high"] - result["low"]


def test_one_seed_interval_equals_the_probes_patient_bootstrap() -> None:
    from headct.eval.metrics import patient_bootstrap

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    patients = np.array([f"pat_{i // 2:03d}" for i in range(60)])
    score = y * 0.5 + rng.random(60)
    mine = model_auroc(bootstrap_aurocs(paired_scores(rows_of({"m": score}, y, patients), ["m"]), 300, 7), "m")
    theirs = patient_bootstrap(y, score, patients, 0.5, 300, 7).intervals["auroc"]
    assert (mine["low"], mine["high"]) == pytest.approx(theirs, abs=1e-12)


def test_few_shot_seeds_are_resampled_and_paired_by_seed() -> None:
    y = np.repeat([0, 1], 20)
    good = y + np.linspace(0, 0.5, 40)
    seeds = np.stack([good, -good])  # seed 0 perfect, seed 1 inverted: the draw decides everything
    boot = bootstrap_aurocs(paired_scores(rows_of({"m": seeds, "same": seeds.copy()}, y, mode="fewshot", k=8),
                                          ["m", "same"]), 400)
    result = model_auroc(boot, "m")
    assert boot.n_seeds == 2 and result["auroc"] == 0.5
    assert result["low"] == 0.0 and result["high"] == 1.0  # patients alone would give [0.5, 0.5]
    assert paired_difference(boot, "m", "same")["diff"] == 0
    assert paired_difference(boot, "m", "same")["high"] == 0  # seed s is paired with seed s, not with another

    rows = rows_of({"m": seeds, "n": seeds[:1]}, y, mode="fewshot", k=8)
    with pytest.raises(ValueError, match="not scored on the same seeds and scans"):
        paired_scores(rows, ["m", "n"])
    with pytest.raises(ValueError, match="a scan appears twice for one seed"):
        paired_scores(pd.concat([rows, rows]), ["m"])


def test_gap_closure() -> None:
    assert gap_closure(0.8, 0.6, 0.9) == pytest.approx(2 / 3)
    assert gap_closure(0.6, 0.6, 0.9) == 0 and gap_closure(0.9, 0.6, 0.9) == 1
    assert gap_closure(0.8, 0.6, 0.6) is None and gap_closure(0.8, 0.7, 0.65) is None


def test_a_stratum_is_its_positives_against_all_negatives() -> None:
    rows = rows_of({"m": np.arange(6.0)}, np.array([0, 0, 1, 1, 1, 1]),
                   patients=np.array(["p0", "p1", "p2", "p3", "p4", "p5"]))
    meta = pd.DataFrame({"scan_id": ["ser_0002", "ser_0003", "ser_0004", "ser_0000"],
                         "patient_id": ["p2", "p3", "p4", "p0"], "bleed_stratum": ["<5", ">30", "<5", ""]})
    strata = strata_of(rows, meta, "bleed_stratum")
    assert list(strata) == [None, None, "<5", ">30", "<5", None]
    assert list(stratum_rows(rows, strata, "<5")["scan_id"]) == ["ser_0000", "ser_0001", "ser_0002", "ser_0004"]
    by_patient = strata_of(rows, meta.drop(columns="scan_id"), "bleed_stratum")
    assert list(by_patient) == list(strata)
    with pytest.raises(KeyError, match="no column 'size'"):
        strata_of(rows, meta, "size")
    assert stratum_order([">30", "5-30", "<5", "n/a"]) == ["<5", "5-30", ">30", "n/a"]


def test_compare_rows_answers_every_question_and_says_why_not() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 40)
    chance = {m: rng.random(80) for m in ("random_init", "random_init.s1", "hu_histogram")}
    rows = rows_of({"pretrained": y + rng.random(80) * 0.5, **chance}, y)
    out = compare_rows(rows, "pretrained", ["random_init", "random_init.s1"], "hu_histogram", 1.0, 300, 0)
    assert out["vs_random"]["beats"] and out["vs_baseline"]["above_zero"]
    assert out["vs_random"]["best"] in ("random_init", "random_init.s1")
    assert out["gap_closure"]["value"] == pytest.approx(1.0) and out["n_pos"] == 40
    alone = compare_rows(rows[rows["model"] == "pretrained"], "pretrained", ["random_init"], "hu_histogram", None,
                         50, 0)
    assert alone["vs_random"] == {"skipped": "no random-init predictions"}
    assert alone["vs_baseline"] == {"skipped": "no predictions of 'hu_histogram'"}
    assert compare_rows(rows, "other", [], None, None, 50, 0) == {"skipped": "no predictions of 'other'"}


def _write_project(root: Path) -> tuple[Path, Path]:
    """Probe and few-shot predictions CSVs (ICH and Fracture; pre-trained separates, the others are noise), a
    split folder whose split.json names a store with meta.csv (ICH severity strata)."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 40)
    scans = np.array([f"ser_{i:04d}" for i in range(80)])
    patients = np.array([f"pat_{i // 2:04d}" for i in range(80)])  # two scans per patient, same target
    others = ("random_init", "random_init.s1", "random_init.s2", "hu_histogram")
    probe, few = [], []
    for label in ("ICH", "Fracture"):
        scores = {"pretrained": y * 0.7 + rng.random(80), **{m: rng.random(80) for m in others}}
        probe.append(rows_of(scores, y, patients, label=label, scans=scans))
        probe.append(rows_of(scores, y, patients, label=label, scans=scans).assign(split="val"))
        for k in (8, 16):
            seeds = {m: np.stack([s + 0.05 * rng.random(80) for _ in range(3)]) for m, s in scores.items()}
            few.append(rows_of(seeds, y, patients, label=label, mode="fewshot", k=k, scans=scans))
    (root / "reports").mkdir()
    pd.concat(probe).to_csv(root / "reports/probe.csv", index=False)
    pd.concat(few).to_csv(root / "reports/fewshot.csv", index=False)
    store, splits = root / "store", root / "splits"
    store.mkdir()
    splits.mkdir()
    (splits / "split.json").write_text(json.dumps({"store": "store"}))
    strata = np.where(y == 1, np.where(np.arange(80) % 2 == 0, "<5", ">30"), "")
    pd.DataFrame({"scan_id": scans, "patient_id": patients, "stratum": strata}).to_csv(
        store / "meta.csv", index=False)
    ceiling = rows_of({"ceiling": y + rng.random(80) * 0.2}, y, patients, label="ICH", mode="finetune", scans=scans)
    ceiling.to_csv(root / "reports/ceiling.csv", index=False)
    return root / "reports/probe.csv", root / "reports/fewshot.csv"


def test_compare_job_writes_every_setting_stratum_and_the_summary(tmp_path: Path, job_ctx) -> None:
    from headct.config import CompareConfig
    from pipelines import compare, report

    probe_csv, few_csv = _write_project(tmp_path)
    cfg = CompareConfig(probe_predictions=probe_csv, fewshot_predictions=few_csv, splits=tmp_path / "splits",
                        report_dir=tmp_path / "out", labels=["Fracture", "SDH"], shots=(4, 8, 16), bootstrap=100,
                        ceiling_predictions=tmp_path / "reports/ceiling.csv")
    compare.run(cfg, job_ctx)
    metrics = json.loads((cfg.report_dir / "metrics.json").read_text())
    assert metrics["settings"] == ["probe", "fewshot_k8", "fewshot_k16"] and set(metrics["summary"]) == {
        "probe", "fewshot_k8", "fewshot_k16"}
    assert "no few-shot predictions at K=4" in metrics["skipped"]["fewshot_k4"]
    assert "no test predictions for SDH" in metrics["skipped"]["probe/SDH"]
    ich = metrics["results"]["fewshot_k16"]["ICH"]
    assert ich["all"]["n_seeds"] == 3 and ich["all"]["n_pos"] == 40 and ich["all"]["n_patients"] == 40
    assert list(ich["strata"]) == ["<5", ">30"] and ich["strata"]["<5"]["n_pos"] == 20
    assert ich["strata"]["<5"]["n_neg"] == 40  # a stratum: its positives against ALL negatives
    assert "strata" not in metrics["results"]["probe"]["Fracture"]  # only compare.stratum_labels
    assert 0.5 < ich["all"]["gap_closure"]["value"] < 1 and ich["all"]["gap_closure"]["ceiling_auroc"] == 1
    assert metrics["summary"]["fewshot_k16"] == {
        "primary_beats_random": True, "primary_beats_baseline": True,
        "primary_gap_closure": ich["all"]["gap_closure"]["value"], "labels_beating_random": ["Fracture"]}
    assert ich["all"]["vs_random"]["best"] in ("random_init", "random_init.s1", "random_init.s2")
    text = (cfg.report_dir / "comparison.md").read_text()
    assert "## fewshot_k16" in text and "| ICH | <5 | 20/40 |" in text

    lines = "\n".join(report.compare_lines(metrics))
    assert "## Does pre-training help? (ICH, test split)" in lines and "| fewshot_k8 | >30 | 20/40 |" in lines

    with pytest.raises(InputError, match=r"ceiling\.csv: models \['a', 'b'\]; name the ceiling"):
        pd.concat([rows_of({"a": np.zeros(2), "b": np.ones(2)}, np.array([0, 1]))]).to_csv(
            tmp_path / "reports/ceiling.csv", index=False)
        compare.run(cfg, job_ctx)
    with pytest.raises(InputError, match=r"probe\.csv: missing column\(s\) \['score'\]"):
        pd.read_csv(probe_csv).drop(columns="score").to_csv(probe_csv, index=False)
        compare.run(cfg, job_ctx)
    with pytest.raises(ValueError, match="not both"):
        CompareConfig(ceiling_predictions=probe_csv, ceiling_metrics=probe_csv)


def test_fine_tuned_arms_are_compared_with_a_noninferiority_verdict(tmp_path: Path, job_ctx) -> None:
    """compare.finetune_predictions: each arm's file (its own model name and seed) becomes one arm of the setting
    `finetune`; the pre-trained arm is "at least as good" when the paired lower bound is >= -margin."""
    from headct.config import CompareConfig
    from pipelines import compare

    probe_csv, _ = _write_project(tmp_path)
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1], 60)
    signal = y * 0.8 + rng.random(120)
    arms = {"pretrained": ("pretrained", 3, signal), "random_init": ("cnn", 3, signal + 0.05 * rng.random(120)),
            "random_init.s3001": ("cnn", 3001, rng.random(120))}
    files = {}
    for arm, (model, seed, score) in arms.items():
        files[arm] = tmp_path / f"ft-{arm}.csv"
        rows_of({model: score}, y, label="ICH", mode="finetune").assign(seed=seed).to_csv(files[arm], index=False)
    cfg = CompareConfig(probe_predictions=probe_csv, fewshot_predictions=None, splits=tmp_path / "splits",
                        report_dir=tmp_path / "out", bootstrap=200, finetune_predictions=files)
    compare.run(cfg, job_ctx)
    metrics = json.loads((cfg.report_dir / "metrics.json").read_text())
    ich = metrics["results"]["finetune"]["ICH"]["all"]
    assert ich["vs_random"]["best"] == "random_init" and not ich["vs_random"]["beats"]  # nearly the same scores
    summary = metrics["summary"]["finetune"]
    assert summary["primary_diff_vs_random"]["low"] > -0.02 and summary["primary_at_least_as_good"] is True
    assert "primary_at_least_as_good" not in metrics["summary"]["probe"]
    assert "At least as good as the best random init" in (cfg.report_dir / "comparison.md").read_text()
    # A worse pre-trained arm fails the margin.
    rows_of({"pretrained": rng.random(120)}, y, label="ICH", mode="finetune").to_csv(files["pretrained"], index=False)
    compare.run(cfg, job_ctx)
    metrics = json.loads((cfg.report_dir / "metrics.json").read_text())
    assert metrics["summary"]["finetune"]["primary_at_least_as_good"] is False
    # An arm's file with two models is refused, naming the file and the arm.
    rows_of({"a": np.zeros(2), "b": np.ones(2)}, np.array([0, 1]), mode="finetune").to_csv(
        files["random_init"], index=False)
    with pytest.raises(InputError, match=r"ft-random_init\.csv: a fine-tuned arm's predictions hold one model"):
        compare.run(cfg, job_ctx)


def test_cli_has_the_compare_command() -> None:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["compare", "--help"])
    assert result.exit_code == 0 and "--set" in result.output


def test_the_default_stratum_column_is_the_one_the_generator_writes() -> None:
    """compare reads strata from the store's meta.csv, which ingest copies from `headct synth`'s truth.csv: a default
    naming another column silently drops every stratum (it did: reports said "no column 'bleed_stratum'")."""
    from headct.config import CompareConfig
    from headct.data.synth.truth import columns

    assert CompareConfig().stratum_column in columns()
