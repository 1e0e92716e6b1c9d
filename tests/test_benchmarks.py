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


def test_evidence_step_speed_runs_every_model_at_tiny_size() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/evidence/step_speed.py"), "mae8", "vit16", "resnet10", "--img", "32",
         "--batch", "2", "--threads", "1", "--repeats", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split()[0] for line in out.stdout.splitlines() if "volumes/s" in line]
    assert rows == ["reference", "mae8", "vit16", "resnet10"], out.stdout


def test_gpu_pretrain_benchmark_smoke_runs_mae_and_dino_on_cpu_with_torch_alone(tmp_path: Path) -> None:
    import json

    report = tmp_path / "gpu_pretrain.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_pretrain.py"), "--device", "cpu", "--size", "tiny", "--img", "32",
         "--patch", "16", "--steps", "1", "--warmup", "0", "--mae-batch", "2", "--dino-batch", "2",
         "--local-crops", "2", "--local-size", "16", "--pool", "4", "--no-compile", "--dino-out-dim", "64",
         "--json", str(report)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no pydantic/MONAI/MLflow" in out.stdout  # the script checks its own imports
    results = {r["method"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"mae", "dino"}
    for r in results.values():
        # the rate is the batch over the measured step (both reported, rounded), not just any positive number
        assert r["volumes_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1000), rel=0.05, abs=0.1)
        assert r["batch"] == 2 and r["loss_finite"] and 0 < r["mfu"] < 1
        assert set(r["split_ms"]) == {"data", "forward", "backward", "optimizer"}
    assert json.loads(report.read_text())["decoder"] == [8, 512]  # the MAE paper's decoder is the default
    assert all(r["data"] == "memory" and r["data_wait_share"] is None for r in results.values())


def test_gpu_pretrain_benchmark_feeds_from_npy_files_through_loader_workers_and_reports_data_wait(
    tmp_path: Path,
) -> None:
    import json

    report = tmp_path / "gpu_pretrain_disk.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_pretrain.py"), "--device", "cpu", "--size", "tiny", "--img", "32",
         "--patch", "16", "--steps", "2", "--warmup", "1", "--mae-batch", "2", "--methods", "mae", "--pool", "4",
         "--no-compile", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
         "--data", "disk", "--workers", "1", "--json", str(report)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = json.loads(report.read_text())["results"]
    assert result["data"] == "disk" and 0.0 <= result["data_wait_share"] <= 1.0
    assert "waiting for data" in out.stdout and result["loss_finite"]


def test_analytic_flops_of_the_gpu_benchmark_agree_with_torch_flop_counter() -> None:
    import importlib.util

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from headct.models.mae import MAE
    from headct.models.vit import build_encoder

    spec = importlib.util.spec_from_file_location("gpu_pretrain", REPO / "benchmarks/gpu_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    enc = build_encoder({"name": "tiny", "img_size": 32, "patch_size": 8, "in_chans": 3, "qkv_bias": False})
    mae = MAE(enc, 0.75, decoder_dim=64, decoder_depth=2, decoder_heads=4)  # a decoder narrower than the encoder
    x = torch.rand(2, 3, 32, 32, 32)
    # The math SDPA backend runs attention as matmuls the counter sees (it does not count the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _, _ = mae(x, torch.Generator().manual_seed(0))
        loss.backward()
    counted = counter.get_total_flops()
    analytic = bench.mae_flops(enc, mae, batch=2)
    assert abs(analytic - counted) / counted < 0.01, (analytic, counted)

    dino = bench.DINO(enc, out_dim=64, hidden_dim=64, bottleneck_dim=32)
    views = [torch.rand(2, 3, 32, 32, 32) for _ in range(2)], [torch.rand(2, 3, 16, 16, 16) for _ in range(3)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dino(*views, 0.04)["loss"].backward()
    analytic = bench.dino_flops(enc, dino, 2, 2, 32, 3, 16)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.02


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
        assert len(result["seconds_all"]) == 1 and result["seconds_min"] == min(result["seconds_all"])
        assert result["series_per_s"] == pytest.approx(2 / result["seconds_min"])  # 2 series, the fastest repeat
        assert 0 < result["cpu_seconds_min"] == min(result["cpu_seconds_all"])
    assert set(report["time_over_headct_w1"]) == methods and report["time_over_headct_w1"]["headct-w1"] == 1.0
    assert set(report["headct_speedup_by_workers"]) == {"1", "2"}
    goal = report["targets"]
    assert goal["seed_chain"]["monai_pydicom_time_over_headct_w1"] > 0 and isinstance(goal["seed_chain"]["met"], bool)
    assert goal["decoding_limit"]["headct_w1_time_over_decode"] > 0
    assert goal["decoding_limit"]["headct_w1_cpu_over_decode_cpu"] > 0 and report["limits"]["decode_cpu_seconds"] > 0
    assert set(goal["scaling"]) == {"2"} and goal["scaling"]["2"]["share_of_ceiling"] > 0
    assert len(report["limits"]["decode_seconds_all"]) == 2  # before the runs, then once per repeat
    assert set(report["load_average_1_5_15_min"]) == {"start", "end"}
    limits = report["limits"]
    for key in ("disk_series_per_s", "input_cold_read_series_per_s", "decode_series_per_s"):
        assert limits[key] > 0, key
    assert limits["cpu_scaling_ceiling"]["2"] > 0
    assert "headct ingest" in out.stdout and "reading limit" in out.stdout
    assert "seed's chain" in out.stdout and "decoding limit: headct" in out.stdout and "scaling: 2 workers" in out.stdout
