"""The MLflow boundary against real stores: SQLite directly, and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from headct.config import Params, TrackingConfig
from headct.tracking import flatten_params, job_run, redact


def test_flatten_params_drops_secrets_and_redacts_uri_passwords() -> None:
    params = Params()
    params.tracking.uri = "postgresql://alice:s3cret@db.internal/mlflow"
    flat = flatten_params(params)
    assert flat["tracking.uri"] == "postgresql://alice:***@db.internal/mlflow"
    assert "s3cret" not in "".join(flat.values())
    assert flat["ingest.preprocess.spacing_mm"] == "2.0"
    assert not any("password" in k for k in flatten_params({"db_password": "x", "a": {"api_key": "y"}}))
    assert redact("sqlite:///tmp/m.db") == "sqlite:///tmp/m.db"


def test_job_run_logs_params_metrics_children_and_artifacts(tmp_path: Path) -> None:
    import mlflow

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="unit")
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with job_run(cfg, "probe", Params().probe, tmp_path) as run:
        run.log_metrics({"auroc": 0.75}, step=3)
        run.log_artifact(artifact, "notes")
        with run.child("label=ICH", params={"label": "ICH"}) as child:
            child.log_metrics({"auroc": 0.8})
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    parent = client.get_run(run.run_id)
    assert parent.data.params["bootstrap"] == "1000"
    assert parent.data.metrics["auroc"] == 0.75
    assert parent.data.tags["headct.job"] == "probe"
    kid = client.get_run(child.run_id)
    assert kid.data.tags["mlflow.parentRunId"] == run.run_id
    assert kid.info.experiment_id == parent.info.experiment_id
    assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == ["notes/note.txt"]
    # artifacts of a local SQLite store live beside it, not in the current folder
    assert (tmp_path / "mlartifacts").is_dir()
    # MLflow exports the URI to the environment; a later job or subprocess must not inherit this store
    assert os.environ.get("MLFLOW_TRACKING_URI") != cfg.uri


def test_provenance_records_whether_tracked_files_differ_from_the_commit(tmp_path: Path) -> None:
    """A real repository: clean, an untracked file (still clean), a changed tracked file, a staged change."""
    import mlflow

    from headct.tracking import git_dirty, git_state

    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_state(repo) == {"git_commit": None}  # not a repository: nothing to be dirty against
    assert git_dirty(repo) is None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert git_state(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "notes.txt").write_text("untracked\n")
    assert git_state(repo)["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo) == {"git_commit": head, "git_dirty": True}
    git("add", "code.py")  # staged, not committed: still not the commit's code
    assert git_state(repo)["git_dirty"] is True

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="git")
    with job_run(cfg, "probe", Params().probe, repo) as run:
        pass
    tags = mlflow.MlflowClient(tracking_uri=cfg.uri).get_run(run.run_id).data.tags
    assert (tags["git.commit"], tags["git.dirty"]) == (head, "true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_job_run_against_a_real_mlflow_server(tmp_path: Path) -> None:
    import mlflow

    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert exe, "mlflow console script not installed beside this interpreter"
    port = _free_port()
    server = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--host", "127.0.0.1",
         "--port", str(port), "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not come up in 180 s"
                time.sleep(0.5)
        cfg = TrackingConfig(uri=url, experiment="served")
        note = tmp_path / "n.txt"
        note.write_text("x")
        with job_run(cfg, "split", Params().split, tmp_path) as run:
            run.log_metrics({"patients": 12.0})
            run.log_artifact(note)
        got = mlflow.MlflowClient(tracking_uri=url).get_run(run.run_id)
        assert got.data.metrics["patients"] == 12.0
        assert got.data.params["seed"] == "0"
        assert (tmp_path / "artifacts").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
