"""A `headct finetune` killed with SIGKILL at a seeded point, then run again, ends with the outputs of an
uninterrupted run, byte for byte apart from timestamps and run ids (issue 12).

The job runs as a real process (`cli.py finetune`) that sends itself SIGKILL at a point drawn from a seeded
generator: after the n-th training step (mid-epoch, before that epoch's checkpoint), or just before or just after
the n-th file the job puts in place under the project (os.replace of an atomic write: a checkpoint, a report, the
classifier's weights or config.json). The kernel ends the process there; no handler, no cleanup runs. The same
command is then run again and must finish, resuming from the last complete epoch's checkpoint.

HEADCT_FAULT_SEEDS=3,4,5 replays other draws (the seeds are printed on failure).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_helpers import make_labelled_project  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEEDS = [int(s) for s in os.environ.get("HEADCT_FAULT_SEEDS", "0,1").split(",")]
OUTPUTS = ("models/classifier", "reports/finetune", "ckpt")

# `headct finetune` that counts its training steps and the files it puts in place under the project, and sends
# itself SIGKILL at `<kind>:<n>` (argv[1]; "count" only counts); the counts go to argv[2] at a normal exit.
KILLABLE = """
import atexit, json, os, signal, sys
from pathlib import Path
kind, _, n = sys.argv[1].partition(":")
n = int(n or 0)
counts_file, root = Path(sys.argv[2]), str(Path.cwd())
counts = {"step": 0, "replace": 0}
def tick(what, phase):
    counts[what] += phase == "after"
    if kind == (what if what == "step" else f"{phase}_{what}") and counts[what] + (phase == "before") == n:
        os.kill(os.getpid(), signal.SIGKILL)
import headct.train.finetune as ft
real_loss = ft.masked_bce
def loss(*args, **kwargs):
    out = real_loss(*args, **kwargs)
    tick("step", "after")
    return out
ft.masked_bce = loss
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    mine = str(Path(dst).absolute()).startswith(root)
    if mine:
        tick("replace", "before")
    real_replace(src, dst, *args, **kwargs)
    if mine:
        tick("replace", "after")
os.replace = replace
atexit.register(lambda: counts_file.write_text(json.dumps(counts)))
import cli
sys.argv = ["headct", "finetune"]
cli.main()
"""
PARAMS = """tracking:
  experiment: fault
finetune:
  splits: data/splits/t
  model_dir: models/mae
  out_dir: models/classifier
  report_dir: reports/finetune
  checkpoint_dir: ckpt
  tuned_params: null
  epochs: 3
  batch_size: 2
  backbone_lr: 1.0e-4
  head_lr: 1.0e-2
  warmup_frac: 0.0
  bootstrap: 20
  min_positives: 1
  threads: 1
  eval_batch_size: 4
  register_as: null
"""


def _finetune(project: Path, point: str) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    counts = project / "counts.json"
    counts.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", KILLABLE, point, str(counts)], cwd=project, env=env,
                         capture_output=True, text=True, timeout=900)
    return out, json.loads(counts.read_text()) if counts.is_file() else {}


def _outputs(project: Path) -> dict[str, bytes]:
    """Every file the job wrote, with the values that may differ between runs set aside: the MLflow run id in
    config.json's provenance, and the seconds trained (a duration) in metrics.json."""
    files = {}
    for folder in OUTPUTS:
        for path in sorted((project / folder).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            rel = path.relative_to(project).as_posix()
            if rel == "models/classifier/config.json":
                config = json.loads(data)
                config["provenance"]["run_id"] = "<run id>"
                data = json.dumps(config).encode()
            elif rel == "reports/finetune/metrics.json":
                data = json.dumps({**json.loads(data), "seconds": "<seconds>"}).encode()
            elif path.suffix == ".pt":  # a checkpoint holds tensors, pickled: compare what it holds
                data = _checkpoint_digest(path)
            files[rel] = data
    return files


def _checkpoint_digest(path: Path) -> bytes:
    """SHA-256 over what a checkpoint holds, less the seconds trained and the Python and NumPy global RNG states:
    nothing in fine-tuning draws from those (its randomness comes from torch and per-step generators), and they
    start from OS entropy in every process."""
    import hashlib

    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()

    def walk(value, key: str) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(key.encode() + value.numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                if f"{key}/{k}" not in ("/extra/seconds", "/rng/python", "/rng/numpy"):
                    walk(value[k], f"{key}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")
        else:
            digest.update(f"{key}={value!r}".encode())

    walk(state, "")
    return digest.hexdigest().encode()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], dict[str, int]]:
    project = make_labelled_project(tmp_path_factory.mktemp("fault") / "proj")
    (project / "params.yaml").write_text(PARAMS)
    out, counts = _finetune(project, "count")
    assert out.returncode == 0, out.stderr[-3000:]
    expected = _outputs(project)
    for folder in OUTPUTS:
        shutil.rmtree(project / folder)
    return project, expected, counts


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_a_finetune_killed_at_a_seeded_point_ends_like_an_uninterrupted_one(uninterrupted, seed: int) -> None:
    project, expected, counts = uninterrupted
    rng = random.Random(seed)
    kind = rng.choice(["step", "before_replace", "after_replace"])
    point = f"{kind}:{rng.randint(1, counts['replace' if 'replace' in kind else 'step'])}"
    try:
        killed, _ = _finetune(project, point)
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])  # SIGKILL, at that point
        again, _ = _finetune(project, "count")
        assert again.returncode == 0, again.stderr[-3000:]
        got = _outputs(project)
        assert sorted(got) == sorted(expected)  # no file more (no temp file of the killed run), none less
        assert [name for name in expected if got[name] != expected[name]] == []
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}, killed at {point}: {exc}") from exc
    finally:
        for folder in OUTPUTS:
            shutil.rmtree(project / folder, ignore_errors=True)
