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
