"""Tracking under a scheduler: an unreachable server stops a job before any work; `tracking.offline` logs locally;
`headct tracking sync SRC DST` uploads those runs once (sync twice: one copy). Real MLflow SQLite stores."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from headct.config import TrackingConfig
from headct.tracking import TrackingUnreachableError, check_reachable, job_run
from headct.tracking_sync import SOURCE_TAG, STATE_TAG, effective, sync


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_an_unreachable_server_is_reported_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingUnreachableError, match=f"MLflow server {uri} unreachable.*tracking.offline=true"):
        check_reachable(TrackingConfig(uri=uri), tmp_path, timeout_s=5)
    with pytest.raises(TrackingUnreachableError, match=r"postgresql://u:\*\*\*@127.0.0.1"):
        check_reachable(TrackingConfig(uri=f"postgresql://u:secret@127.0.0.1:{_closed_port()}/m"), tmp_path, 5)
    assert check_reachable(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db"), tmp_path) == f"sqlite:///{tmp_path}/m.db"

    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: {uri}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["synth", "out"])
    assert result.exit_code == 1 and "unreachable" in result.output
    assert not (tmp_path / "out").exists()  # nothing was generated: the check came first
    offline = CliRunner().invoke(cli.app, ["synth", "out", "--set", "tracking.offline=true", "--set",
                                           "synth.n_patients=2", "--set", "synth.matrix=64"])
    assert offline.exit_code == 0 and (tmp_path / "mlflow-offline.db").is_file(), offline.output


def _log_runs(uri: str, root: Path) -> dict[str, str]:
    """A parent run with a metric history, params, an artifact and a nested child, as the jobs log them."""
    cfg = TrackingConfig(uri=uri, experiment="offline")
    (root / "note.txt").write_text("hello")
    with job_run(cfg, "warm-up", {"seed": 3}, root) as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_artifact(root / "note.txt", "reports")
        with run.child("label-ICH", {"label": "ICH"}) as child:
            child.log_metrics({"auroc": 0.75})
            child_id = child.run_id
        parent_id = run.run_id
    return {"parent": parent_id, "child": child_id}


def test_offline_runs_sync_once_however_often_sync_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # MLflow would put a new experiment's artifacts in ./mlruns
    src, dst = f"sqlite:///{tmp_path}/offline.db", f"sqlite:///{tmp_path}/server.db"
    assert effective(TrackingConfig(uri="http://mlflow:5000", offline=True, offline_uri=src), tmp_path).uri == src
    ids = _log_runs(src, tmp_path)
    first = sync(src, dst)
    assert (first["copied"], first["already"]) == (2, 0)
    second = sync(src, dst)
    assert (second["copied"], second["already"], second["redone"]) == (0, 2, 0)

    client = mlflow.MlflowClient(tracking_uri=dst)
    exp = client.get_experiment_by_name("offline")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one copy each
    by_source = {r.data.tags[SOURCE_TAG]: r for r in runs}
    parent, child = by_source[ids["parent"]], by_source[ids["child"]]
    assert {r.data.tags[STATE_TAG] for r in runs} == {"complete"}
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id  # nested under the parent's copy
    history = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "loss")]
    assert history == [(s, 1.0 / (s + 1)) for s in range(5)]
    source = mlflow.MlflowClient(tracking_uri=src).get_run(ids["parent"])
    assert parent.data.params == source.data.params and parent.info.status == "FINISHED"
    assert parent.info.start_time == source.info.start_time and parent.info.end_time == source.info.end_time
    local = client.download_artifacts(parent.info.run_id, "reports", str(tmp_path / "back"))
    assert (Path(local) / "note.txt").read_text() == "hello"
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path.parent / "mlruns").exists()  # beside the store


def test_a_partial_copy_left_by_an_interrupted_sync_is_redone(tmp_path: Path, monkeypatch) -> None:
    import headct.tracking_sync as tracking_sync

    src, dst = f"sqlite:///{tmp_path}/offline.db", f"sqlite:///{tmp_path}/server.db"
    _log_runs(src, tmp_path)
    real = tracking_sync._copy_run

    def copy_then_stop(source, target, run, experiment_id, parent):  # dies after the first artifact upload
        client = target
        client.log_artifacts = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(source, client, run, experiment_id, parent)

    monkeypatch.setattr(tracking_sync, "_copy_run", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sync(src, dst)
    monkeypatch.undo()
    counts = sync(src, dst)
    assert counts["redone"] == 1 and counts["copied"] == 1
    client = mlflow.MlflowClient(tracking_uri=dst)
    runs = client.search_runs([client.get_experiment_by_name("offline").experiment_id])
    assert len(runs) == 2 and {r.data.tags[STATE_TAG] for r in runs} == {"complete"}


def test_headct_tracking_sync_defaults_to_the_offline_store_and_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: sqlite:///{tmp_path}/server.db\n  offline: true\n")
    _log_runs(f"sqlite:///{tmp_path}/mlflow-offline.db", tmp_path)
    for _ in range(2):
        result = CliRunner().invoke(cli.app, ["tracking", "sync"], env={**os.environ})
        assert result.exit_code == 0, result.output
    assert "0 run(s) copied, 2 already there" in result.output
    same = CliRunner().invoke(cli.app, ["tracking", "sync", f"sqlite:///{tmp_path}/server.db",
                                        f"sqlite:///{tmp_path}/server.db"])
    assert same.exit_code == 1 and "same store" in same.output
