"""The MLflow UI as a user sees it after a pipeline ran: a real `mlflow server` (127.0.0.1, a free port) over the
SQLite store of real headct jobs (split -> pretrain -> extract -> probe on a tiny store), opened in headless
Chromium at the address `make ui` prints. The page must be the runs table of the model-training view (not MLflow's
GenAI overview) and list every job's run by its name.

Chromium is Debian's `chromium` (`.ci/run` installs it); where it is missing the test skips saying so, except under
CI (CI set, as `.ci/run` does), where it fails like the real-CT tests (tests/real_ct.py). `slow`: about 40 s of
jobs on 2 cores, then a server and a browser start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import mlflow_ui  # noqa: E402

EXPERIMENT = "ui"
# What describe() names these jobs with the configs below: a job-only name ("probe") would fail the test.
# extract and probe name the encoder by what its model directory records (method, architecture), not its folder.
EXPECTED = ["split synth", "pretrain mae vit-tiny p8 16^3", "extract mae vit-tiny p8 features",
            "probe mae vit-tiny p8 vs baselines"]


def need_chromium() -> None:
    if mlflow_ui.chromium() is None:
        reason = "no Chromium (Debian: apt-get install --no-install-recommends chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)


def run_chain(root: Path) -> str:
    """A 40-scan store of random 16^3 volumes (2 scans per patient, ICH on every other patient), then the real
    split, pretrain (8 samples), extract and probe jobs logging to root/mlflow.db; returns that store's URI."""
    import torch

    from headct.config import (
        ExtractConfig,
        JobContext,
        PretrainConfig,
        ProbeConfig,
        SplitConfig,
        TrackingConfig,
    )
    from pipelines import extract, pretrain, probe, split
    from tests.store_helpers import write_store

    rng = np.random.default_rng(0)
    store = root / "data/store/synth"
    volumes = {f"ser_{i:04d}": rng.integers(-1024, 1500, size=(16, 16, 16)).astype(np.int16) for i in range(40)}
    patients = {scan: f"pat_{i // 2:04d}" for i, scan in enumerate(volumes)}
    write_store(store, volumes, patients)
    pd.DataFrame({"scan_id": list(volumes), "patient_id": list(patients.values()),
                  "ICH": [(i // 2) % 2 for i in range(len(volumes))]}).to_csv(store / "labels.csv", index=False)
    uri = f"sqlite:///{root}/mlflow.db"
    ctx = JobContext(root=root, tracking=TrackingConfig(uri=uri, experiment=EXPERIMENT))
    splits, features, model = root / "data/splits/synth", root / "data/features/synth", root / "models/mae"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to busy neighbours
    try:
        split.run(SplitConfig(store=store, out=splits, fractions=(0.5, 0.25, 0.25), report_dir=root / "reports/split"),
                  ctx)
        pretrain.run(PretrainConfig(splits=splits, model_dir=model, checkpoint_dir=root / "ckpt",
                                    report_dir=root / "reports/pretrain", arch="tiny", patch_size=8, batch_size=2,
                                    samples=8, eval_volumes=2, log_every=2, checkpoint_every=100, threads=1,
                                    register_as=None), ctx)
        extract.run(ExtractConfig(splits=splits, model_dir=model, out=features, batch_size=8, device="cpu"), ctx)
        probe.run(ProbeConfig(splits=splits, features=features, report_dir=root / "reports/probe", bootstrap=20,
                              c_grid=(1.0,)), ctx)
    finally:
        torch.set_num_threads(threads)
    return uri


@pytest.mark.slow
def test_the_ui_opens_on_the_runs_table_listing_the_pipelines_runs(tmp_path: Path) -> None:
    need_chromium()
    uri = run_chain(tmp_path)
    # Deadlines to wait, not speeds asserted: on a loaded machine the server and the React app start slowly.
    with mlflow_ui.serve(uri, tmp_path / "mlartifacts", timeout=400) as base:
        exp_id = mlflow_ui.experiment_id(base, EXPERIMENT)
        assert exp_id is not None and mlflow_ui.experiment_id(base, "no such experiment") is None
        names = mlflow_ui.top_run_names(base, exp_id)
        assert sorted(names) == sorted(EXPECTED)  # the probe's per-label child runs are folded under it
        url = mlflow_ui.runs_url(base, exp_id)
        page = mlflow_ui.open_page(url, EXPECTED, timeout=400)  # returns as soon as every name shows
    assert page.found, f"runs not listed; page {page.url!r} titled {page.title!r}:\n{page.text[:2000]}"
    # The runs view of the model-training workflow, not the GenAI overview (traces, token usage) it can land on.
    assert page.url.split("#", 1)[1].startswith(f"/experiments/{exp_id}/runs"), page.url
    assert "workflowType=machine_learning" in page.url and page.title.startswith("Runs"), (page.url, page.title)
    assert not [word for word in ("Observability", "Token Usage") if word in page.text], page.text[:2000]
    assert "Run Name" in page.text  # the grid's header: the names above are rows of the runs table


def test_runs_url_is_the_model_training_runs_view_and_store_paths_become_sqlite_uris(tmp_path: Path) -> None:
    assert mlflow_ui.runs_url("http://127.0.0.1:5000", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert mlflow_ui.store_uri(str(tmp_path / "m.db")) == f"sqlite:///{tmp_path}/m.db"
    assert mlflow_ui.store_uri("postgresql://db/mlflow") == "postgresql://db/mlflow"
    (tmp_path / "params.yaml").write_text("tracking:\n  experiment: headct-quick\n")
    assert mlflow_ui.workspace_experiment(tmp_path) == "headct-quick"
    assert mlflow_ui.workspace_experiment(tmp_path / "none") == "headct"  # no params file: headct's default


def test_figures_refuse_a_workspace_without_the_report_naming_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "reports/report").mkdir(parents=True)
    (tmp_path / "reports/report/radar.png").write_bytes(b"")
    with pytest.raises(mlflow_ui.UIError, match=r"reports/report: no fewshot\.png"):
        mlflow_ui.figures(tmp_path, tmp_path / "out")


def test_shrink_png_fits_the_width_and_keeps_the_picture(tmp_path: Path) -> None:
    from PIL import Image

    gradient = np.tile(np.linspace(0, 255, 1600, dtype=np.uint8), (400, 1))
    Image.fromarray(np.stack([gradient, 255 - gradient, np.full_like(gradient, 128)], -1)).save(tmp_path / "a.png")
    size = mlflow_ui.shrink_png(tmp_path / "a.png", tmp_path / "out/b.png", max_width=640)
    with Image.open(tmp_path / "out/b.png") as small:
        assert small.size == (640, 160) and size == (tmp_path / "out/b.png").stat().st_size
        rgb = np.asarray(small.convert("RGB"), dtype=float)
    assert abs(rgb[:, 0, 0].mean() - 0) < 8 and abs(rgb[:, -1, 0].mean() - 255) < 8  # left dark, right bright
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written through a temporary file, renamed
