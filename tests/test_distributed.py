"""Data-parallel pre-training under a real `torchrun` with two CPU processes and the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from headct.models.model_dir import load_model_dir
from headct.train.distributed import weights_digest
from tests.pretrain_helpers import make_project

WORKER = Path(__file__).with_name("ddp_pretrain_worker.py")


def test_two_rank_torchrun_pretrain_keeps_ranks_in_sync(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(root)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = {(root / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1  # both ranks ended with identical weights
    metrics = json.loads((root / "reports/pretrain/metrics.json").read_text())
    # 16 samples over 2 ranks x batch 2 = 4 steps; the model directory holds the ranks' common weights.
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["samples"] == 16
    assert metrics["weights_sha256"] in digests
    encoder, _ = load_model_dir(root / "models/mae")
    assert metrics["heldout_loss_end"] < metrics["heldout_loss_start"]
    assert encoder.embed_dim == 192 and weights_digest(encoder)  # loads strictly
    assert proc.stdout.count("headct pretrain (MAE)") == 1  # one summary: only rank 0 reports
