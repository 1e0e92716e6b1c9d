"""Shared fixtures. Tests never touch the project's own data/, models/ or mlflow.db."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def sqlite_tracking(tmp_path: Path):
    """A TrackingConfig pointing at a fresh SQLite MLflow store inside tmp_path."""
    from headct.config import TrackingConfig

    return TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real SQLite MLflow store for the session (creating one costs seconds of schema migration)."""
    from headct.config import TrackingConfig
    from headct.tracking import job_run

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    with job_run(TrackingConfig(uri=uri, experiment="warm-up"), "warm-up", {}, folder):
        pass
    return uri


@pytest.fixture
def job_ctx(tmp_path: Path, mlflow_store: str, request: pytest.FixtureRequest):
    """A JobContext rooted at tmp_path, logging to the session's real MLflow store in its own experiment."""
    from headct.config import JobContext, TrackingConfig

    return JobContext(root=tmp_path, tracking=TrackingConfig(uri=mlflow_store, experiment=request.node.nodeid))


def runs_of(ctx) -> list:
    """Every MLflow run logged under this context's experiment (parents and children)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ctx.tracking.uri)
    exp = client.get_experiment_by_name(ctx.tracking.experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors: one thread is as fast, and immune to busy neighbours; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
