"""Two processes on one store and one MLflow database (issue 12), as real concurrent processes.

- Jobs that open a fresh `mlflow.db` at the same moment all finish with their runs recorded (before the creation
  lock in headct.tracking, MLflow's schema migrations raced and one died with "duplicate column name" or an
  alembic CommandError), and jobs logging to one database at the same time lose nothing.
- A second `headct ingest` into a DEST another ingest is writing is refused with the lock message and exit 1,
  changes nothing, and the first one's store is whole.

Processes are lined up with files, not sleeps: each worker says it is ready and waits for a "go" file, so their
first MLflow calls start together; the first ingest pauses inside its conversion (holding the store's lock) until
the test lets it go.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from ingest_helpers import TEST_KEY  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = 40  # metric steps each logging worker writes, one batch per step

# One job's worth of MLflow traffic through headct.tracking: the whole config as params, a metric batch per step,
# a child run, an artifact. argv: project root, tag, folder of the ready/go files, steps.
LOGGING_JOB = """
import sys, time
from pathlib import Path
from headct.config import Params, TrackingConfig
from headct.tracking import job_run
root, tag, marks, steps = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
(marks / f"ready-{tag}").touch()
while not (marks / "go").exists():
    time.sleep(0.005)
note = marks / f"note-{tag}.txt"
note.write_text(tag)
with job_run(TrackingConfig(experiment="together"), "probe", Params().probe, root, tags={"worker": tag}) as run:
    for step in range(steps):
        run.log_metrics({"loss": float(step), "auroc": step / 100}, step=step)
    with run.child(f"label={tag}", params={"label": tag}) as child:
        child.log_metrics({"auroc": 0.5})
    run.log_artifact(note, "notes")
print(run.run_id)
"""

# `headct ingest` whose first conversion waits for the go file (it then holds DEST's lock, mid-run).
PAUSED_INGEST = """
import sys, time
from pathlib import Path
import headct.data.ingest as ingest_module
marks, real = Path(sys.argv[1]), ingest_module.convert_study
def paused(*task):
    (marks / "paused").touch()
    while not (marks / "go").exists():
        time.sleep(0.02)
    return real(*task)
ingest_module.convert_study = paused
import cli
sys.argv = ["headct", *sys.argv[2:]]
cli.main()
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HEADCT_PSEUDONYM_KEY": TEST_KEY,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HEADCT_PSEUDONYM_KEY_FILE", None)
    return env


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], limit_s: float = 600) -> None:
    """Until every path exists; fails early when a process has already ended (it would never write it)."""
    deadline = time.monotonic() + limit_s
    while not all(p.exists() for p in paths):
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, [p.communicate() for p in ended]
        assert time.monotonic() < deadline, f"never appeared: {[p for p in paths if not p.exists()]}"
        time.sleep(0.05)


def _logging_jobs_at_once(project: Path, tags: list[str]) -> list[str]:
    """Start one logging job per tag, release them together, return their run ids (each must exit 0)."""
    marks = project / f"marks-{tags[0]}"
    marks.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", LOGGING_JOB, str(project), tag, str(marks), str(STEPS)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in tags]
    _wait_for([marks / f"ready-{tag}" for tag in tags], procs)
    (marks / "go").touch()
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def test_jobs_opening_a_fresh_mlflow_db_at_once_all_finish_and_concurrent_logging_loses_nothing(
        tmp_path: Path) -> None:
    import mlflow

    project = tmp_path / "project"
    project.mkdir()
    first = _logging_jobs_at_once(project, ["a", "b", "c"])  # all three create mlflow.db and the experiment
    second = _logging_jobs_at_once(project, ["d", "e"])  # the database exists: plain concurrent writers
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "together"]  # one, however many raced
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=100)}
    assert len(runs) == 2 * 5  # five jobs, each with its child
    for run_id in first + second:
        run = runs[run_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["bootstrap"] == "1000"
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))  # every step of every writer is there
        assert [a.path for a in client.list_artifacts(run_id, "notes")] == [f"notes/note-{run.data.tags['worker']}.txt"]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") in runs]
    assert sorted(r.data.params["label"] for r in children) == ["a", "b", "c", "d", "e"]


def _project_with_series(project: Path, n: int) -> Path:
    src = project / "data" / "raw" / "export"
    for i in range(n):
        write_series(src / f"s{i}", SeriesSpec(n_slices=8 + i), patient_id=f"PID-{i:03d}")
    (project / "params.yaml").write_text(
        "tracking:\n  experiment: stores\n"
        "ingest:\n  labels: null\n  labels_format: none\n  patient_key: dicom\n  workers: 1\n"
        "  preprocess:\n    shape: [32, 32, 32]\n    spacing_mm: 6.0\n"
        "  qc:\n    min_slices: 8\n    min_coverage_mm: 30.0\n")
    return src


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_ingest_into_a_store_being_written_is_refused_and_the_store_stays_whole(tmp_path: Path) -> None:
    from headct.data import store
    from headct.data.volumes import load_volume

    project = tmp_path / "project"
    src = _project_with_series(project, 3)
    marks = tmp_path / "marks"
    marks.mkdir()
    args = ["ingest", str(src), "data/store/site"]
    first = subprocess.Popen([sys.executable, "-c", PAUSED_INGEST, str(marks), *args], cwd=project, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for([marks / "paused"], [first])  # mid-run: DEST exists, its lock is held
    dest = project / "data" / "store" / "site"
    before = _tree(dest)
    second = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=project, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr
    said = " ".join((second.stdout + second.stderr).split())  # rich wraps long lines
    assert "is being written by another ingest" in said and f"held by pid {first.pid}" in said, said
    assert _tree(dest) == before  # the refused writer changed nothing
    (marks / "go").touch()
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    # The first writer's store is whole: every series in the manifest, every volume there and matching its
    # SHA-256 (read through the jobs' checked reader), nothing else in volumes/, no temp file, no holder left.
    manifest = store.read_manifest(dest)
    assert len(manifest) == 3
    for row in manifest.itertuples():
        assert load_volume(dest / row.volume, row.scan_id).shape == (32, 32, 32)
    assert sorted(p.name for p in (dest / "volumes").iterdir()) == sorted(Path(v).name for v in manifest["volume"])
    assert not [p for p in dest.rglob("*") if ".tmp" in p.name or p.name.endswith(".holder")]
    # Once the first has ended, the same command runs and finds the store complete (every volume reused).
    again = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=project, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store.read_manifest(dest).equals(manifest)

