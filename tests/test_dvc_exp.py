"""A real `dvc exp run` on the quick profile: `-S` sets the documented knobs, `dvc exp show` compares the
experiments by their headlines, and `-S` on a tuned key is refused rather than silently overridden.

Runs the chain up to the probe twice (a baseline and a changed pre-training), about four minutes on 2 busy
cores: `slow`. The check that every profile spells out the documented knobs is fast.
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

# The documented `dvc exp run -S` knobs: DVC's -S can only set a key the params file already holds.
KNOBS = {
    "pretrain": ("method", "arch", "patch_size", "samples", "batch_size", "lr", "mask_ratio"),
    "probe": ("bootstrap", "labels", "c_grid", "select_by"),
    "finetune": ("init", "pool", "labels", "epochs", "batch_size", "layer_decay", "drop_path_rate", "tuned_params"),
}


@pytest.mark.parametrize("profile", ["params.yaml", "params-quick.yaml", "params-slow.yaml"])
def test_every_profile_spells_out_the_documented_knobs_and_no_tuned_key(profile: str) -> None:
    import yaml

    from headct.config import load_params
    from headct.config.finetune import TUNED_KEYS

    tree = yaml.safe_load((REPO / profile).read_text())
    missing = [f"{s}.{k}" for s, keys in KNOBS.items() for k in keys if k not in (tree.get(s) or {})]
    assert not missing, f"{profile}: add {missing} (at their defaults) so `dvc exp run -S` can set them"
    assert not set(TUNED_KEYS) & set(tree["finetune"])
    load_params(REPO / profile, root=REPO)  # valid as written


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
                    "metrics": {path: m.get("data") or {} for path, m in (data.get("metrics") or {}).items()},
                }
    return out


@pytest.mark.slow
def test_exp_run_sets_knobs_and_exp_show_compares_headlines(tmp_path: Path) -> None:
    ws = workspace.make_workspace(tmp_path / "ws", REPO / "params-quick.yaml", git_repo=True)
    dvc(ws, "exp", "run", "-n", "base", "probe")
    dvc(ws, "exp", "run", "-n", "p16", "-S", "pretrain.patch_size=16", "-S", "pretrain.samples=16",
        "-S", "probe.bootstrap=40", "-S", "probe.c_grid=[0.1,1.0]", "probe")
    exps = experiments(json.loads(dvc(ws, "exp", "show", "--json").stdout))
    assert {"base", "p16"} <= set(exps), sorted(exps)
    base, p16 = exps["base"], exps["p16"]
    assert (p16["params"]["pretrain"]["patch_size"], p16["params"]["pretrain"]["samples"]) == (16, 16)
    assert base["params"]["pretrain"]["patch_size"] == 8 and p16["params"]["probe"]["bootstrap"] == 40
    assert p16["params"]["probe"]["c_grid"] == [0.1, 1.0]
    for exp in (base, p16):  # each experiment's own headlines, read back through dvc.lock and the cache
        pretrain = exp["metrics"]["reports/pretrain/headline.json"]
        assert set(pretrain) == {"heldout_loss_start", "heldout_loss_end", "volumes_per_s", "samples"}
        assert "pretrained" in exp["metrics"]["reports/probe/headline.json"]
    assert (base["metrics"]["reports/pretrain/headline.json"]["samples"],
            p16["metrics"]["reports/pretrain/headline.json"]["samples"]) == (32, 16)

    # --only-changed: the knobs that differ and the metrics that moved, not the unchanged rest.
    csv = dvc(ws, "exp", "show", "--only-changed", "--drop", "headct/|pipelines/|data/", "--csv").stdout
    header = csv.splitlines()[0].split(",")
    assert {"pretrain.patch_size", "pretrain.samples", "probe.bootstrap"} <= set(header), header
    assert "pretrain.lr" not in header and "heldout_loss_end" in header
    assert not [c for c in header if c.startswith(("headct/", "pipelines/"))]  # code dep hashes dropped

    # A tuned key is not in params.yaml, so plain -S is DVC's own error; added with `+`, the tuned file would
    # override it: refused by headct (exit 2 before any work), naming the way out.
    assert dvc(ws, "exp", "run", "-S", "finetune.head_lr=0.02", "tune", check=False).returncode != 0
    refused = dvc(ws, "exp", "run", "-S", "+finetune.head_lr=0.02", "tune", check=False)
    assert refused.returncode != 0
    assert "finetune.head_lr set here" in refused.stdout + refused.stderr
    assert "finetune.tuned_params=null" in refused.stdout + refused.stderr
