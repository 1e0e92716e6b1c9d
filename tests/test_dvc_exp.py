"""A real `dvc exp run` on the quick profile: `-S` sets the documented knobs, `dvc exp show` compares the
experiments by their headlines, and `-S` on a tuned key is refused rather than silently overridden.

Runs the chain up to the probe twice (a baseline and a changed pre-training), about two minutes: `slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import workspace  # noqa: E402

pytestmark = pytest.mark.slow


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["dvc", *args], cwd=ws, env=workspace.dvc_env(), capture_output=True, text=True,
                            check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def experiments(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its params and metrics} (DVC 3 layout)."""
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                out[rev.get("name") or exp.get("name")] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: m["data"] for path, m in (data.get("metrics") or {}).items()},
                }
    return out


def test_exp_run_sets_knobs_and_exp_show_compares_headlines(tmp_path: Path) -> None:
    ws = workspace.make_workspace(tmp_path / "ws", REPO / "params-quick.yaml", git_repo=True)
    dvc(ws, "exp", "run", "-n", "base", "probe")
    dvc(ws, "exp", "run", "-n", "p16", "-S", "pretrain.patch_size=16", "-S", "pretrain.samples=16",
        "-S", "probe.bootstrap=40", "probe")
    exps = experiments(json.loads(dvc(ws, "exp", "show", "--json").stdout))
    assert {"base", "p16"} <= set(exps), sorted(exps)
    base, p16 = exps["base"], exps["p16"]
    assert (p16["params"]["pretrain"]["patch_size"], p16["params"]["pretrain"]["samples"]) == (16, 16)
    assert base["params"]["pretrain"]["patch_size"] == 8 and p16["params"]["probe"]["bootstrap"] == 40
    for exp in (base, p16):  # each experiment's own headlines, read back through dvc.lock and the cache
        pretrain = exp["metrics"]["reports/pretrain/headline.json"]
        assert set(pretrain) == {"heldout_loss_start", "heldout_loss_end", "volumes_per_s", "samples"}
        assert "pretrained" in exp["metrics"]["reports/probe/headline.json"]
    assert (base["metrics"]["reports/pretrain/headline.json"]["samples"],
            p16["metrics"]["reports/pretrain/headline.json"]["samples"]) == (32, 16)

    # --only-changed: the knobs that differ and the metrics that moved, not the unchanged rest.
    csv = dvc(ws, "exp", "show", "--only-changed", "--csv").stdout
    header = csv.splitlines()[0].split(",")
    assert {"pretrain.patch_size", "pretrain.samples", "probe.bootstrap"} <= set(header), header
    assert "pretrain.lr" not in header and "heldout_loss_end" in header

    # A tuned key through -S would be overridden by params/tuned/finetune.yaml: refused, naming the way out.
    refused = dvc(ws, "exp", "run", "-S", "finetune.head_lr=0.02", "tune", check=False)
    assert refused.returncode != 0
    assert "finetune.head_lr set here" in refused.stdout + refused.stderr
    assert "finetune.tuned_params=null" in refused.stdout + refused.stderr
