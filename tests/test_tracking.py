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


def test_runs_are_named_and_tagged_for_what_they_are_and_the_experiment_opens_on_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from headct import tracking

    monkeypatch.setenv("DVC_STAGE", "probe")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="kinds")
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    probe = Params().probe.model_copy(update={"model_dir": tmp_path / "PID 0042" / "my model!",
                                              "splits": tmp_path / "exports" / "cq500"})
    with job_run(cfg, "probe", probe, tmp_path) as run:
        pass
    got = client.get_run(run.run_id)
    assert got.info.run_name == "probe my-model vs baselines"
    tags = got.data.tags
    assert {k: tags[k] for k in ("headct.stage", "headct.store", "headct.model", "headct.method", "dvc.stage")} == {
        "headct.stage": "probe", "headct.store": "cq500", "headct.model": "my-model",
        "headct.method": "linear-probe", "dvc.stage": "probe"}
    assert len(tags["headct.pipeline_id"]) == 12 and tags["headct.pipeline_id"] == tracking.pipeline_id(tmp_path)
    assert not [v for v in tags.values() if str(tmp_path) in v or "PID" in v]  # labels, never paths
    assert tracking.LAST_RUN["run_id"] == run.run_id and tracking.LAST_RUN["name"] == got.info.run_name
    kind = client.get_experiment_by_name("kinds").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # MLflow's UI opens on the runs, not the GenAI view
    # An experiment made before (no kind) gets it; a kind someone chose stays.
    old = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("older", "chosen"):
        with job_run(TrackingConfig(uri=cfg.uri, experiment=name), "report", Params().report, tmp_path):
            pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_every_job_name_is_a_short_description_without_paths() -> None:
    from headct.run_meta import describe

    params = Params()
    for job in ("synth", "ingest", "split", "pretrain", "extract", "probe", "fewshot", "retrieval", "compare",
                "tune", "finetune", "explain", "report", "predict"):
        name, tags = describe(job, getattr(params, job), grid=[64, 64, 64])
        assert name.split()[0] == job and "/" not in name and len(name) < 60, name
        assert not [v for v in tags.values() if "/" in v], tags
    assert describe("pretrain", params.pretrain, grid=[64, 64, 64])[0] == "pretrain mae vit-tiny p16 64^3"
    assert describe("ingest", params.ingest)[0] == "ingest synth"


def test_pipeline_id_groups_one_repro_and_changes_with_code_or_params(tmp_path: Path) -> None:
    """dvc.lock is rewritten after every stage of a repro: the id ignores it; code and params.yaml count."""
    from headct.tracking import pipeline_id

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("probe:\n  bootstrap: 50\n")
    outside = pipeline_id(repo)  # no git: the params alone
    (repo / "params.yaml").write_text("probe:\n  bootstrap: 60\n")
    assert pipeline_id(repo) != outside

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                       check=True, capture_output=True)

    (repo / "code.py").write_text("x = 1\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / ".gitignore").write_text("/mlflow.db\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    first = pipeline_id(repo)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {synth: {}}\n")  # a stage finished
    (repo / ".gitignore").write_text("/mlflow.db\n/data\n")  # DVC ignored its output
    assert pipeline_id(repo) == first
    (repo / "params.yaml").write_text("probe:\n  bootstrap: 70\n")  # dvc exp run -S probe.bootstrap=70
    assert pipeline_id(repo) != first
    (repo / "params.yaml").write_text("probe:\n  bootstrap: 60\n")
    assert pipeline_id(repo) == first
    (repo / "code.py").write_text("x = 2\n")  # uncommitted code
    assert pipeline_id(repo) != first


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


def test_encoder_jobs_are_named_by_what_the_model_directory_records(tmp_path: Path) -> None:
    """A mim CNN kept in a folder called `mae` is named `mim cnn`, not `mae`; a relative folder is read under the
    project root (never the working directory); no config.json (or a foreign one): the folder's label."""
    import json

    from headct.run_meta import describe, encoder_label

    folder = tmp_path / "models" / "mae"
    folder.mkdir(parents=True)
    probe = Params().probe.model_copy(update={"model_dir": Path("models/mae")})
    assert describe("probe", probe, root=tmp_path)[0] == "probe mae vs baselines"  # nothing recorded yet
    (folder / "config.json").write_text(json.dumps({"method": "mim", "arch": {"name": "cnn", "channels": [8]}}))
    name, tags = describe("probe", probe, root=tmp_path)
    assert name == "probe mim cnn vs baselines" and tags["headct.model"] == "mim cnn"
    assert describe("probe", probe)[0] == "probe mae vs baselines"  # no root: the label, not a read of the cwd
    extract = Params().extract.model_copy(update={"model_dir": folder})
    (folder / "config.json").write_text(json.dumps({"method": "mae", "arch": {"name": "tiny", "patch_size": 8}}))
    assert describe("extract", extract)[0] == "extract mae vit-tiny p8 features"
    (folder / "config.json").write_text(json.dumps({"method": "../../PID 42", "arch": {"name": "cnn"}}))
    assert encoder_label(folder) == "PID-42 cnn"  # config values are sanitised like folder labels
    (folder / "config.json").write_text("{not json")
    assert encoder_label(folder) == "mae"
