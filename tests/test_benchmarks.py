"""The benchmark scripts still run (a tiny smoke run; no timing is asserted: speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # ~30 s: synthetic data, two worker processes (torch, MONAI imports), MONAI's 1 mm cubic resample
def test_ingest_benchmark_runs_every_method_on_tiny_series(tmp_path: Path) -> None:
    out_json = tmp_path / "ingest.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/ingest.py"), "--series", "2", "--matrix", "64", "--slice-mm", "5",
         "--workers", "1,2", "--warmup", "0", "--repeats", "1", "--disk-probe-mb", "8", "--data", str(tmp_path),
         "--out", str(out_json)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = json.loads(out_json.read_text())
    methods = {"headct-w1", "headct-w2", "monai-pydicom", "dcm2niix-monai"}
    assert set(report["results"]) == methods
    assert report["inputs"]["series"] == 2 and report["inputs"]["rows"] == 64
    for result in report["results"].values():
        assert result["series_per_s"] > 0 and len(result["seconds_all"]) == 1
    assert set(report["time_over_headct_w1"]) == methods and report["time_over_headct_w1"]["headct-w1"] == 1.0
    assert set(report["headct_speedup_by_workers"]) == {"1", "2"}
    assert report["floor"]["ratio"] > 0 and isinstance(report["floor"]["met"], bool)
    limits = report["limits"]
    for key in ("disk_series_per_s", "input_cold_read_series_per_s", "decode_series_per_s"):
        assert limits[key] > 0, key
    assert limits["cpu_scaling_ceiling"]["2"] > 0
    assert "headct ingest" in out.stdout and "reading limit" in out.stdout
