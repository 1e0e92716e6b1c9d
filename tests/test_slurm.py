"""The Slurm templates on a real single-node Slurm (Debian's slurm-wlm + munge, configured and started by
slurm/dev/start-cluster.sh: no cgroups, daemons in the foreground in the background of this test), submitted
by `headct slurm` as a user would:

- the ingest array (`--shard K/N`) + dependent merge equals the unsharded run;
- 2 tasks each running `torchrun --nnodes 2` (gloo) equal, bit for bit, the same world size run outside Slurm;
- `scancel --signal=USR1` on a running pre-training job: it checkpoints, requeues itself (`scontrol requeue`),
  and the requeued run resumes to the weights of an uninterrupted run.

Skipped only where apt-get is unavailable (slurm-wlm and munge cannot be installed there); with apt-get but
without the packages the tests fail, naming the install command (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from headct.train import checkpoint
from tests.conftest import REPO
from tests.pretrain_helpers import ctx_for, make_cfg, make_project

# Slow set; each test gets up to 20 minutes (pytest-timeout's default is 10): on a loaded 2-core machine one
# headct process under Slurm takes minutes to import and start. A real fault ends them sooner (see _wait).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
START, STOP = REPO / "slurm" / "dev" / "start-cluster.sh", REPO / "slurm" / "dev" / "stop-cluster.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 64000:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """SLURM_CONF of a running one-node cluster; stopped at the end of the module."""
    extra = ":/usr/sbin:/sbin"
    missing = [d for d in DAEMONS if shutil.which(d, path=os.environ["PATH"] + extra) is None]
    if missing:
        if shutil.which("apt-get") is None:
            pytest.skip(f"apt-get unavailable, so slurm-wlm and munge cannot be installed here (missing {missing})")
        pytest.fail(f"{missing} not found: apt-get install -y slurm-wlm munge (.ci/run does this)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": os.environ["PATH"] + extra, "HEADCT_SLURM_PORT": str(_free_port_pair()),
           "HEADCT_SLURM_CPUS": "4"}
    started = subprocess.run(["bash", str(START), str(state)], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"start-cluster.sh failed:\n{started.stdout}\n{started.stderr}"
    try:
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(STOP), str(state)], env=env, capture_output=True, timeout=120)


def _job_env(cluster: dict[str, str]) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): this checkout's code and venv."""
    env = {**cluster, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _headct_slurm(project: Path, env: dict[str, str], *args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REPO / "cli.py"), "slurm", *args, "--set",
                          f"slurm.templates={REPO / 'slurm'}"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.findall(r"submitted job (\S+)", out.stdout)


def _job(job_id: str, env: dict[str, str]) -> list[dict[str, str]]:
    """scontrol's record of a job (one dict per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def _wait(job_id: str, env: dict[str, str], logs: Path, limit_s: float = 600) -> list[dict[str, str]]:
    deadline = time.monotonic() + limit_s  # a safety net for a stuck queue, not a timed assertion
    while time.monotonic() < deadline:
        records = _job(job_id, env)
        if records and all(r["JobState"] in FINAL for r in records):
            return records
        if any(r.get("Reason") == "DependencyNeverSatisfied" for r in records):
            pytest.fail(f"job {job_id} waits for a job that failed:\n{_logs(logs)}")
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.out")))
    pytest.fail(f"job {job_id} not finished after {limit_s} s: {_job(job_id, env)}\n{tails}")


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.out")))


def test_ingest_array_and_dependent_merge_equal_the_unsharded_run(
    cluster, tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(REPO / "tests"))  # the ingest helpers import dicom_factory as a top-level module
    from dicom_factory import SeriesSpec, write_series

    from headct.data import store
    from tests.ingest_helpers import TEST_KEY, run_ingest
    from tests.ingest_helpers import make_cfg as ingest_cfg

    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", TEST_KEY)
    whole = ingest_cfg(tmp_path / "whole")
    for i in range(4):  # four studies of four patients, and a re-export of the first (a duplicate across studies)
        write_series(whole.src / f"p{i}", SeriesSpec(centre=(0.0, 0.0, 1.5 * i)), patient_id=f"PID-ARRAY-{i:04d}")
    write_series(whole.src / "again", SeriesSpec(centre=(0.0, 0.0, 0.0)), patient_id="PID-AGAIN-0001")
    assert run_ingest(whole)["rejected"] == {"duplicate": 1}
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({
        # An MLflow store made before the array starts: concurrent tasks creating one SQLite store collide.
        "tracking": {"uri": mlflow_store, "experiment": "slurm-ingest"},
        "ingest": {"src": str(whole.src), "dest": "data/store/site", "labels": None, "labels_format": "none",
                   "patient_key": "dicom", "qc": {"min_slices": 8, "min_coverage_mm": 30},
                   "preprocess": {"shape": [32, 32, 32], "spacing_mm": 6.0}},
        "slurm": {"ingest": {"shards": 2, "cpus_per_task": 1, "mem": "200M", "merge_cpus": 1, "merge_mem": "200M"}},
    }))
    env = {**_job_env(cluster), "HEADCT_PSEUDONYM_KEY": TEST_KEY}
    array, merge = _headct_slurm(project, env, "ingest")
    done = _wait(merge, env, project / "logs/slurm")
    tasks = _job(array, env)
    assert len(tasks) == 2 and {t["JobState"] for t in tasks} == {"COMPLETED"}, _logs(project / "logs/slurm")
    assert done[0]["JobState"] == "COMPLETED", _logs(project / "logs/slurm")
    assert done[0]["StartTime"] >= max(t["EndTime"] for t in tasks)  # the merge waited for the whole array
    merged = project / "data/store/site"
    assert sorted(p.name for p in (merged / "shards").iterdir()) == ["1of2", "2of2"]
    pd.testing.assert_frame_equal(store.read_manifest(whole.dest), store.read_manifest(merged))
    for relpath in store.read_manifest(merged)["volume"]:
        assert (whole.dest / relpath).read_bytes() == (merged / relpath).read_bytes()


def _pretrain_project(root: Path, mlflow_store: str, **kw) -> Path:
    project = make_project(root)
    section = make_cfg(project, threads=1, register_as=None, **kw).model_dump(mode="json")
    (project / "params.yaml").write_text(yaml.safe_dump({"pretrain": section,
                                                         "tracking": {"uri": mlflow_store, "experiment": "slurm"}}))
    return project


def test_two_slurm_tasks_of_torchrun_nnodes_2_equal_the_same_world_size_outside_slurm(
    cluster, tmp_path: Path, mlflow_store: str
) -> None:
    project = _pretrain_project(tmp_path / "p", mlflow_store, samples=16, batch_size=2, accum_steps=2, checkpoint_every=2)
    env = _job_env(cluster)
    (job,) = _headct_slurm(project, env, "pretrain", "--set", "slurm.pretrain.tasks_per_node=2",
                           "--set", "slurm.pretrain.gpus_per_node=0", "--set", "slurm.pretrain.cpus_per_task=1",
                           "--set", "slurm.pretrain.time=00:20:00")
    (record,) = _wait(job, env, project / "logs/slurm")
    assert record["JobState"] == "COMPLETED", _logs(project / "logs/slurm")
    assert "2 x 1 processes" in _logs(project / "logs/slurm")  # two torchrun agents of one process each
    inside = json.loads((project / "reports/pretrain/metrics.json").read_text())

    outside = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "--no-python",
         "headct", "pretrain", "--set", f"pretrain.checkpoint_dir={project}/ckpt_out", "--set",
         f"pretrain.model_dir={project}/models/out", "--set", f"pretrain.report_dir={project}/reports/out"],
        cwd=project, env={k: v for k, v in env.items() if not k.startswith("SLURM")}, capture_output=True,
        text=True, timeout=600)
    assert outside.returncode == 0, outside.stdout[-3000:] + outside.stderr[-3000:]
    reference = json.loads((project / "reports/out/metrics.json").read_text())
    assert inside["world_size"] == reference["world_size"] == 2 and inside["steps"] == 4
    assert inside["weights_sha256"] == reference["weights_sha256"]  # bit for bit
    a, b = (checkpoint.load_checkpoint(next((project / d).glob("*/complete.pt"))) for d in ("ckpt", "ckpt_out"))
    assert a["extra"]["losses"] == b["extra"]["losses"]


def test_scancel_signal_usr1_checkpoints_requeues_and_the_requeued_job_resumes(
    cluster, tmp_path: Path, mlflow_store: str
) -> None:
    from pipelines.pretrain import run

    project = _pretrain_project(tmp_path / "p", mlflow_store, samples=120, checkpoint_every=5)
    env = _job_env(cluster)
    (job,) = _headct_slurm(project, env, "pretrain", "--set", "slurm.pretrain.gpus_per_node=0",
                           "--set", "slurm.pretrain.cpus_per_task=1", "--set", "slurm.pretrain.time=00:20:00")
    logs = project / "logs/slurm"
    deadline = time.monotonic() + 600
    while not list((project / "ckpt").glob("*/last.pt")) and time.monotonic() < deadline:
        assert _job(job, env)[0]["JobState"] in {"PENDING", "RUNNING", "CONFIGURING"}, _logs(logs)
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--signal=USR1", job], env=env, capture_output=True, text=True, timeout=60)
    assert signalled.returncode == 0, signalled.stderr
    while _job(job, env)[0].get("Restarts") != "1" and time.monotonic() < deadline:
        assert _job(job, env)[0]["JobState"] not in FINAL, _logs(logs)  # it must requeue, not end
        time.sleep(0.5)
    # Slurm makes a requeued job eligible two minutes later (EligibleTime); release it now rather than wait.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=60)
    (record,) = _wait(job, env, logs)
    log = _logs(logs)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
    whole_log = "".join(p.read_text() for p in logs.glob("*.out"))  # both runs, appended (--open-mode=append)
    assert "SIGUSR1 received: stopped after global step" in whole_log and f"requeued Slurm job {job}" in whole_log
    metrics = json.loads((project / "reports/pretrain/metrics.json").read_text())
    assert 5 <= metrics["resumed_from_step"] < metrics["steps"] == 60, log
    whole = run(make_cfg(project, threads=1, register_as=None, samples=120, checkpoint_every=5,
                         checkpoint_dir=project / "ckpt_ref", model_dir=project / "models/ref",
                         report_dir=project / "reports/ref"), ctx_for(project))
    assert metrics["weights_sha256"] == whole["weights_sha256"]
    a, b = (checkpoint.load_checkpoint(next((project / d).glob("*/complete.pt"))) for d in ("ckpt", "ckpt_ref"))
    assert a["extra"]["losses"] == b["extra"]["losses"]
