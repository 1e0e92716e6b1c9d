"""The benchmark scripts still run (a tiny smoke run; no timing is asserted: speed lives in benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_train_step_benchmark_runs_both_models_at_tiny_size() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/train_step.py"), "--size", "tiny", "--img", "32", "--patch", "16",
         "--batch", "1", "--threads", "1", "--warmup", "0", "--repeats", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("headct ViT3D", "MONAI ViT"))]
    assert len(rows) == 2, out.stdout
    # same configuration: parameter counts agree to within the CLS token and MONAI's unused cross-attention norm
    params = [float(row.split()[-4]) for row in rows]
    assert abs(params[0] - params[1]) / params[0] < 0.01, rows
