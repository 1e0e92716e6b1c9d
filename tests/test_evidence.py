"""scripts/evidence.py (`make evidence SEED=N`): the profile, the derived seeds, and the runner end to end on a tiny
profile (workspace, every stage with this checkout's code, the result JSON, --resume)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from headct.config.loader import load_params

REPO = Path(__file__).resolve().parent.parent


def runner():
    """scripts/evidence.py as a module (registered first: its dataclass looks itself up in sys.modules)."""
    if "evidence_runner" not in sys.modules:
        spec = importlib.util.spec_from_file_location("evidence_runner", REPO / "scripts" / "evidence.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["evidence_runner"] = module
        spec.loader.exec_module(module)
    return sys.modules["evidence_runner"]


TINY = {
    "tracking": {"experiment": "evidence-test"},
    "synth": {"n_patients": 30, "matrix": 64, "pixel_mm": 3.6, "extra_series_fraction": 0.0, "workers": 1},
    "ingest": {"workers": 1, "qc": {"min_slices": 8},
               "preprocess": {"shape": [32, 32, 32], "spacing_mm": 6.0}},
    "split": {"counts": {"val": 8, "test": 8}, "labelled_train": 8},
    "pretrain": {"patch_size": 16, "use_val": False, "batch_size": 4, "samples": 8, "eval_volumes": 2,
                 "log_every": 1, "register_as": None},
    "extract": {"batch_size": 8},
    "probe": {"features": "data/features/synth", "bootstrap": 20},
    "fewshot": {"shots": [1], "seeds": 2},
    "tune": {"n_trials": 1, "epochs": 1, "n_startup_trials": 1, "pruner_startup_trials": 1},
    "finetune": {"epochs": 1, "batch_size": 4, "bootstrap": 20, "labels": ["ICH"]},
    "ceiling": {"epochs": 1, "batch_size": 4, "bootstrap": 20, "labels": ["ICH"]},
    "evidence": {
        "seeds": [11, 12], "labels": ["ICH", "IPH"],
        "finetune_arms": True, "arms": {"random_init": {"init": "random"}},
    },
}


def test_the_profile_declares_its_seeds_and_labels_and_is_valid_in_both_sizes(tmp_path: Path) -> None:
    evidence_runner = runner()
    text = (REPO / "params-evidence.yaml").read_text()
    assert "evidence seeds: 11 and 12" in text and "reported labels: ICH (primary), IPH, MassEffect, SDH, SAH" in text
    for quick in (False, True):
        tree, evidence = evidence_runner.load_profile(REPO / "params-evidence.yaml", quick)
        assert evidence["seeds"] == [11, 12] and evidence["labels"] == ["ICH", "IPH", "MassEffect", "SDH", "SAH"]
        derived = evidence_runner.derive_seeds(tree, 11)
        assert {"synth.seed", "split.seed", "pretrain.seed", "extract.seed", "probe.seed", "fewshot.seed",
                "finetune.seed", "tune.seed"} <= set(derived)
        assert {v for v in derived.values() if isinstance(v, int)} == {11}
        # the twin's init seeds: N itself (the pre-trained encoder's start) and two more, apart from the rest
        assert derived["extract.random_init_seeds"] == [11, 11001, 11002]
        path = tmp_path / f"params-{quick}.yaml"
        path.write_text(yaml.safe_dump(tree))
        params, _ = load_params(params_file=path, root=tmp_path)
        assert params.pretrain.use_val is False and params.pretrain.pool and params.synth.seed == 11
        assert params.ceiling.train_splits == ["train", "pool"] and params.ceiling.init == "random"
    tree, _ = evidence_runner.load_profile(REPO / "params-evidence.yaml", False)
    counts, labelled = tree["split"]["counts"], tree["split"]["labelled_train"]
    pool = tree["synth"]["n_patients"] - counts["val"] - counts["test"] - labelled
    assert pool >= 10 * labelled  # the setting foundation models exist for


def test_the_runner_runs_every_stage_in_a_workspace_and_writes_the_result(tmp_path: Path) -> None:
    evidence_runner = runner()
    profile, ws, out = tmp_path / "profile.yaml", tmp_path / "ws", tmp_path / "seed-5.json"
    # First without the fine-tuned arms; they are added to the finished run below (--resume).
    profile.write_text(yaml.safe_dump({**TINY, "evidence": {**TINY["evidence"], "finetune_arms": False}}))
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["seed"] == 5 and not result["declared_seed"]
    assert result["git"]["commit"] and isinstance(result["git"]["dirty"], bool)
    assert list(result["stages"]) == ["synth", "ingest", "split", "learnability", "pretrain", "extract", "probe",
                                      "fewshot", "ceiling", "compare"]
    assert all(stage["seconds"] > 0 for stage in result["stages"].values())
    # The workspace's params.yaml: the profile without the runner's section, every seed = N.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert "evidence" not in params and params["synth"]["seed"] == params["split"]["seed"] == 5
    assert result["seeds"]["pretrain.seed"] == 5
    found = result["results"]
    assert found["data"]["patients"] == {"train": 8, "val": 8, "test": 8, "pool": 6}
    assert json.loads((ws / "reports/pretrain/metrics.json").read_text())["train_scans"] == 14  # train + pool
    probe = found["probe"]
    assert {"pretrained", "random_init", "hu_histogram"} <= set(probe)
    assert all(0.0 <= probe[m]["ICH"]["auroc"] <= 1.0 for m in ("pretrained", "random_init", "hu_histogram"))
    assert "ICH" in found["fewshot"]["pretrained"]
    ceiling = found["finetune"]["ceiling"]
    assert ceiling["model"] == "ceiling_cnn" and 0.0 <= ceiling["test"]["ICH"]["auroc"] <= 1.0
    assert "hu_histogram" in found["learnability"]
    # --resume reruns nothing that finished, and refuses a workspace made from other settings.
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws), "--out", str(out),
                                 "--resume"]) == 0
    again = json.loads(out.read_text())
    assert all(stage["resumed"] for stage in again["stages"].values()) and again["results"] == found
    # Arms added to the finished run (command-line settings, the same params.yaml): --resume runs the arms (in the
    # profile's order: yaml.safe_dump sorts the keys) and every stage after the first that runs, nothing before.
    profile.write_text(yaml.safe_dump({**TINY, "evidence": {**TINY["evidence"], "arms": {
        **TINY["evidence"]["arms"], "pretrained": {"init": "pretrained"}}}}))
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws), "--out", str(out),
                                 "--resume"]) == 0
    again = json.loads(out.read_text())
    assert [e["status"] for e in again["earlier_invocations"]] == ["ok", "ok"]  # the first run and the resume
    ran = [name for name, stage in again["stages"].items() if not stage.get("resumed")]
    assert ran == ["tune-pretrained", "finetune-pretrained", "tune-random_init", "finetune-random_init", "compare"]
    assert again["results"]["finetune"]["random_init"]["model"] == "random_init"
    fine = json.loads((ws / "reports/compare/metrics.json").read_text())["results"]["finetune"]["ICH"]["all"]
    assert set(fine["aurocs"]) == {"pretrained", "random_init"}
    # One arm's setting changed: compare's own command is the same, yet it runs again (it reads the new predictions)
    profile.write_text(yaml.safe_dump({**TINY, "evidence": {**TINY["evidence"], "arms": {
        "pretrained": {"init": "pretrained"}, "random_init": {"init": "random", "min_positives": 2}}}}))
    compared_before = (ws / "reports/compare/metrics.json").stat().st_mtime_ns
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws), "--out", str(out),
                                 "--resume"]) == 0
    again = json.loads(out.read_text())
    ran = [name for name, stage in again["stages"].items() if not stage.get("resumed")]
    assert ran == ["tune-random_init", "finetune-random_init", "compare"]
    assert (ws / "reports/compare/metrics.json").stat().st_mtime_ns > compared_before
    assert evidence_runner.main(["--seed", "6", "--profile", str(profile), "--dest", str(ws), "--out", str(out),
                                 "--resume"]) == 1


def test_an_arm_with_several_seeds_is_tuned_once_and_fine_tuned_at_each_derived_seed(tmp_path: Path) -> None:
    evidence_runner = runner()
    profile = tmp_path / "params.yaml"
    tree, evidence = {k: v for k, v in TINY.items() if k != "evidence"}, {
        **TINY["evidence"], "arms": {"pretrained": {"init": "pretrained"}, "random_init": {"init": "random",
                                                                                           "seeds": 3}}}
    evidence_runner.derive_seeds(tree, 7)  # in place: every seed = 7
    profile.write_text(yaml.safe_dump(tree))
    params, _ = load_params(params_file=profile, root=tmp_path)
    stages = {stage.name: stage.argv for stage in evidence_runner.plan(evidence, params)}
    assert [n for n in stages if n.startswith(("tune-", "finetune-"))] == [
        "tune-pretrained", "finetune-pretrained", "tune-random_init", "finetune-random_init",
        "finetune-random_init.s7001", "finetune-random_init.s7002"]
    assert "finetune.seed=7002" in stages["finetune-random_init.s7002"]
    assert "finetune.tuned_params=params/tuned/random_init.yaml" in stages["finetune-random_init.s7002"]
    compare = " ".join(stages["compare"])
    assert "random_init.s7002: reports/finetune-random_init.s7002/predictions.csv" in compare
    with pytest.raises(evidence_runner.EvidenceError, match="seeds must be >= 1"):
        evidence_runner.plan({**evidence, "arms": {"random_init": {"seeds": 0}}}, params)


def test_a_bad_profile_stops_before_any_stage_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evidence_runner = runner()
    bad = {**TINY, "ceiling": {**TINY["ceiling"], "arch": "resnet99"}}
    profile, ws = tmp_path / "profile.yaml", tmp_path / "ws"
    profile.write_text(yaml.safe_dump(bad))
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws),
                                 "--out", str(tmp_path / "x.json")]) == 1
    assert "ceiling.arch" in capsys.readouterr().err and not (ws / "logs").exists()
    old_style = {**TINY, "evidence": {**TINY["evidence"], "ceiling": {"arch": "cnn"}}}
    profile.write_text(yaml.safe_dump(old_style))
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws)]) == 1
    assert "the ceiling is now the top-level `ceiling:` section" in capsys.readouterr().err
    profile.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "evidence"}))
    assert evidence_runner.main(["--seed", "5", "--profile", str(profile), "--dest", str(ws)]) == 1
    assert "no `evidence:` section" in capsys.readouterr().err


def test_a_failing_stage_is_named_with_its_log(tmp_path: Path) -> None:
    evidence_runner = runner()
    stage = evidence_runner.Stage("oops", ["python", "scripts/no_such_script.py"])
    with pytest.raises(evidence_runner.EvidenceError, match=r"stage oops failed \(exit 2\).*logs/oops\.log"):
        evidence_runner.run_stage(stage, tmp_path, evidence_runner.environment())
    assert "no_such_script.py" in (tmp_path / "logs/oops.log").read_text()
