"""The MLflow boundary: with `headct.tracking_sync` (offline runs copied to a server later), the only module in
headct that imports mlflow.

One MLflow run per job invocation (`job_run`), nested child runs for labels/seeds/trials (`RunLogger.child`).
Params are the job's whole validated config, flattened to dotted keys, with anything secret-looking removed and
every path replaced by a label (`path_label`): a folder named after a patient or a record number must not land in
the tracking database. Each run is named and tagged by `headct.run_meta.describe` (store label, model, method,
stage) and carries a `headct.pipeline_id` that groups the runs of one `dvc repro` (`pipeline_id`). Experiments are
created as `custom_model_development` (a model-training experiment; MLflow 3.17's UI still opens an experiment on
its GenAI overview unless the address asks for the runs, which is the address `make ui` prints). `LAST_RUN`
records the latest run this process started (the CLI prints its id when a job ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from headct.config.base import TrackingConfig
from headct.run_meta import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, describe

# Telemetry off before mlflow is ever imported (REFERENCE.md section 6).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|pseudonym_key)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@\s]+)@", re.I)
_MAX_PARAM_CHARS = 6000
# A path component shown as it is in MLflow: lowercase words such as `data`, `store`, `synth`, `cq500`,
# `reads.csv`, `rsna2019`. Capitals, spaces, `^` (DICOM's name separator) and digit runs of 6 or more (record
# and accession numbers) are not: such a path is logged as a hash.
_SAFE_PART = re.compile(r"[a-z][a-z0-9_.-]{0,39}")
_LONG_NUMBER = re.compile(r"[0-9]{6,}")
# The headct package folder, shipped with every registered pyfunc (code_paths). Found from this file, not by
# `import headct`, whose lazy attributes (load_encoder, load_classifier) would tie a registering stage's code deps
# (scripts/dvc_deps.py) to both public surfaces.
PACKAGE = Path(__file__).resolve().parent


def pyfunc_requirements() -> list[str]:
    """pip requirements of a registered headct pyfunc: the installed torch, safetensors and numpy."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "safetensors", "numpy")]


def register_pyfunc(
    artifact_path: str, python_model: Any, artifacts: dict[str, str], grid: list[int], output: tuple[str, int],
    name: str, tags: Mapping[str, str], description: str | None = None,
) -> str:
    """Log a headct pyfunc (the package as code_paths, int16 HU volumes (B, *grid) in, (B, width) of `output`'s
    dtype out) in the active run and register it as a new version of `name` with `tags` and `description`.
    Returns the version."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    dtype, width = output
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.int16), (-1, *grid))]),
                               outputs=Schema([TensorSpec(np.dtype(dtype), (-1, width))]))
    with warnings.catch_warnings():
        # No input example on purpose: it would run the model on a full volume at log time (slow for ViT-B) and
        # store it; the signature above is explicit.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(name=artifact_path, python_model=python_model, artifacts=artifacts,
                                       code_paths=[str(PACKAGE)], pip_requirements=pyfunc_requirements(),
                                       signature=signature, registered_model_name=name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    return version


LAST_RUN: dict[str, str] = {}  # run_id, name, experiment, uri (redacted) of the latest job run of this process


def redact(value: str) -> str:
    """Remove a password from a URI-like string (`postgresql://u:pw@host` -> `postgresql://u:***@host`)."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


def _safe(part: str) -> bool:
    return bool(_SAFE_PART.fullmatch(part)) and not _LONG_NUMBER.search(part)


def path_label(path: Path, root: Path | None) -> str:
    """How a path is logged: its path under the project root when every folder name in it is safe (`_SAFE_PART`),
    `<outside>/<name>` for a path outside the root whose last name is safe, else `sha256:<12 hex>` of the
    absolute path (tells runs apart; not a secret: a guessed path can be hashed and compared)."""
    resolved = Path(path).expanduser().resolve()
    if root is not None and resolved.is_relative_to(root.resolve()):
        parts = resolved.relative_to(root.resolve()).parts
        if all(_safe(part) for part in parts):
            return "/".join(parts) or "."
    elif _safe(resolved.name):
        return f"<outside>/{resolved.name}"
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"sha256:{digest}"


def _labelled(python: Any, as_json: Any, root: Path | None) -> Any:
    """The JSON dump `as_json` of a config with each value that is a Path in the Python dump `python` labelled."""
    if isinstance(python, Path):
        return path_label(python, root)
    if isinstance(python, Mapping) and isinstance(as_json, Mapping):
        return {k: _labelled(python[k], as_json[k], root) if k in python else v for k, v in as_json.items()}
    if isinstance(python, list | tuple) and isinstance(as_json, list) and len(python) == len(as_json):
        return [_labelled(p, j, root) for p, j in zip(python, as_json, strict=True)]
    return as_json


def flatten_params(params: BaseModel | Mapping[str, Any], prefix: str = "", root: Path | None = None) -> dict[str, str]:
    """Dotted-key, string-valued view of a config, secrets dropped, URIs redacted and paths labelled
    (`path_label`; `root`: the project root)."""
    if isinstance(params, BaseModel):
        tree = _labelled(params.model_dump(), params.model_dump(mode="json"), root)
    else:
        tree = {k: path_label(v, root) if isinstance(v, Path) else v for k, v in params.items()}
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}.", root=root))
        else:
            flat[name] = redact(str(value))[:_MAX_PARAM_CHARS]
    return flat


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """The store URI: config value, else MLFLOW_TRACKING_URI, else `sqlite:///<root>/mlflow.db`."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


class TrackingUnreachableError(RuntimeError):
    """The tracking server or database in tracking.uri does not answer (found before any work starts)."""


def check_reachable(cfg: TrackingConfig, root: Path, timeout_s: float = 15.0) -> str:
    """Fail fast, before a job does any work, when the tracking store is a server that does not answer: an HTTP(S)
    MLflow server must answer GET /health; a database URI (postgresql, mysql, mssql) must accept a connection.
    Local stores (SQLite, files) need no check. Returns the (redacted) URI; TrackingUnreachableError naming it and
    the cause otherwise."""
    uri = tracking_uri(cfg, root)
    scheme = uri.split(":", 1)[0].lower()
    hint = ("; start it, fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.offline=true to log locally and "
            "upload later with `headct tracking sync`")
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as answer:  # noqa: S310
                if answer.status != 200:
                    raise TrackingUnreachableError(f"MLflow server {redact(uri)} answered /health with HTTP "
                                                   f"{answer.status}{hint}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnreachableError(f"MLflow server {redact(uri)} unreachable ({reason}){hint}") from None
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, pool_pre_ping=True, connect_args={"connect_timeout": int(timeout_s)}
                                              if scheme.startswith(("postgres", "mysql")) else {})
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # noqa: BLE001  drivers raise their own types (missing driver, refused, auth)
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise TrackingUnreachableError(f"tracking database {redact(uri)} unreachable ({redact(first)}){hint}") \
                from None
    return redact(uri)


def _git(root: Path, *args: str) -> str | None:
    """stdout of `git <args>` in `root`, or None when git is missing, fails (not a repository) or hangs."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(root: Path) -> str | None:
    """The HEAD commit of the repository holding `root`; None outside one."""
    out = _git(root, "rev-parse", "HEAD")
    return (out or "").strip() or None


def git_dirty(root: Path) -> bool | None:
    """True when a tracked file differs from HEAD (staged or not; untracked files do not count), so a commit id
    alone would not name the code that ran; None outside a repository."""
    out = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def git_state(root: Path) -> dict[str, Any]:
    """Provenance of the code: {"git_commit", "git_dirty"}; outside a repository {"git_commit": None} only
    (there is nothing to be dirty against)."""
    commit = git_commit(root)
    if commit is None:
        return {"git_commit": None}
    return {"git_commit": commit, "git_dirty": git_dirty(root)}


def pipeline_id(root: Path) -> str:
    """12 hex digits naming one pipeline run: SHA-256 over the git commit (or "no-git"), the diff of tracked files
    against it (uncommitted code counts) leaving out what `dvc repro` itself rewrites as stages finish (dvc.lock,
    .gitignore files), and the bytes of `<root>/params.yaml` (what `dvc exp run -S` edits). Every stage of one
    `dvc repro` or `dvc exp run` gets the same id; a change of code or params gives a new one."""
    import hashlib

    digest = hashlib.sha256()
    commit = git_commit(root)
    digest.update((commit or "no-git").encode())
    if commit:
        digest.update((_git(root, "diff", "HEAD", "--", ".", ":(exclude,glob)**/dvc.lock",
                            ":(exclude,glob)**/.gitignore") or "").encode())
    params = root / "params.yaml"
    digest.update(params.read_bytes() if params.is_file() else b"")
    return digest.hexdigest()[:12]


class RunLogger:
    """Thin handle on an active MLflow run; every call goes to this run even while a child is open."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        self.run_id = run_id
        self.root = root  # the project root: paths in params are logged relative to it (path_label)

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient()

    def log_params(self, params: BaseModel | Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = flatten_params(params, prefix, self.root)
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._client().log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self._client().log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client().set_tag(self.run_id, key, redact(str(value)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client().log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._client().log_artifacts(self.run_id, str(folder), artifact_path)

    @contextlib.contextmanager
    def child(self, name: str, params: BaseModel | Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
        """A nested run (one label, seed, shot count or trial)."""
        import mlflow

        experiment_id = self._client().get_run(self.run_id).info.experiment_id  # children beside the parent
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=name, nested=True, parent_run_id=self.run_id
        ) as run:
            logger = RunLogger(run.info.run_id, self.root)
            if params is not None:
                logger.log_params(params)
            yield logger


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """Hold `<db>.lock` (an OS lock beside a local SQLite store) exclusively, waiting for it, while this process
    first opens the store and looks up or creates the experiment. MLflow creates a fresh database's schema by
    running its alembic migrations on first open, with nothing to stop a second process doing the same at the
    same time: two jobs starting on a new `mlflow.db` then died with "duplicate column name" or an alembic
    CommandError. Once this process has opened the store (MLflow caches it per URI), ordinary writes are
    SQLite's own business. flock is freed by the kernel however the holder ends, so it never goes stale; the
    lock file stays (removing it would let a waiter lock a file nobody else sees). Other stores: no lock."""
    db = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if not db or db.startswith(":memory:") or not Path(db).parent.is_dir():
        yield
        return
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder has opened the store (seconds at most)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ensure_experiment(name: str, artifact_root: Path | None) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if EXPERIMENT_KIND_TAG not in existing.tags:  # made before headct set it (or by hand): a user's choice stays
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return existing.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001  another process (a tune worker) created it between our lookup and create
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


@contextlib.contextmanager
def job_run(
    cfg: TrackingConfig,
    job: str,
    params: BaseModel | Mapping[str, Any],
    root: Path,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> Iterator[RunLogger]:
    """Start one MLflow run for a job invocation; params = the job's validated config. The run's name and tags
    come from `headct.run_meta.describe` (`run_name` replaces the name; `tags` add to and win over its tags).

    Artifacts of a local SQLite store go to `<root>/mlartifacts` (not the current folder), so the store
    and its artifacts stay together wherever the command runs from.
    """
    import mlflow

    uri = tracking_uri(cfg, root)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # note: MLflow also exports it as MLFLOW_TRACKING_URI (restored below)
    try:
        yield from _run(cfg, job, params, root, uri, tags, run_name)
    finally:
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _run(
    cfg: TrackingConfig,
    job: str,
    params: BaseModel | Mapping[str, Any],
    root: Path,
    uri: str,
    tags: Mapping[str, Any] | None,
    run_name: str | None,
) -> Iterator[RunLogger]:
    import mlflow

    artifact_root = root / "mlartifacts" if uri.startswith("sqlite:") else None
    with _creation_lock(uri):
        experiment_id = _ensure_experiment(cfg.experiment, artifact_root)
    name, described = describe(job, params, root=root)
    run_tags = {"headct.job": job, **described, "headct.pipeline_id": pipeline_id(root), **(tags or {})}
    git = git_state(root)
    if git["git_commit"]:
        run_tags["git.commit"], run_tags["git.dirty"] = git["git_commit"], str(git["git_dirty"]).lower()
    extra: dict[str, Any] = {}
    if cfg.system_metrics:
        extra = {"log_system_metrics": True}
    name = run_name or name
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=run_tags, **extra) as run:
        logger = RunLogger(run.info.run_id, root)
        logger.log_params(params)
        yield logger
    LAST_RUN.clear()
    LAST_RUN.update(run_id=run.info.run_id, name=name, experiment=cfg.experiment, uri=redact(uri))
