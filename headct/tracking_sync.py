"""Offline tracking and `headct tracking sync SRC DST`: runs logged where the tracking server could not be reached
(compute nodes without a route to it, a server down for maintenance) are uploaded later, once.

`tracking.offline: true` makes every job log to a local store (`tracking.offline_uri`, default
`sqlite:///<project root>/mlflow-offline.db`) instead of `tracking.uri`; no server is contacted. `sync` copies each
finished run of SRC into the experiment of the same name in DST: name, tags, params, every metric's full history
(steps and timestamps), artifacts, status, start and end times, and the parent of a nested run (mapped to its copy).

Idempotent: each copy carries the tag `headct.synced_from` (the source run id) and `headct.sync_state`, set to
"complete" only after its last artifact is uploaded. A second sync skips complete copies; a copy an interrupted sync
left "partial" is deleted and made again; so syncing twice leaves one copy. Runs still running in SRC are left for
a later sync. Registered model versions are not copied (a registry entry points at its own store's artifacts):
register from DST after the sync where needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from headct.config.base import TrackingConfig

SOURCE_TAG = "headct.synced_from"
STATE_TAG = "headct.sync_state"
PARENT_TAG = "mlflow.parentRunId"
UNFINISHED = ("RUNNING", "SCHEDULED")


def offline_uri(cfg: TrackingConfig, root: Path) -> str:
    """Where an offline job logs: `tracking.offline_uri`, else `sqlite:///<root>/mlflow-offline.db`."""
    return cfg.offline_uri or f"sqlite:///{Path(root).resolve()}/mlflow-offline.db"


def effective(cfg: TrackingConfig, root: Path) -> TrackingConfig:
    """The tracking settings a job uses: with `offline`, the local store in place of the server."""
    return cfg.model_copy(update={"uri": offline_uri(cfg, root)}) if cfg.offline else cfg


def _artifact_root(uri: str) -> str | None:
    """A SQLite store's artifacts beside it (`<folder>/mlartifacts`, as `headct.tracking` does), never in the
    current folder (MLflow's default); a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _copy_run(src: Any, dst: Any, run: Any, experiment_id: str, parent: str | None) -> str:
    from mlflow.entities import Param

    tags = {k: v for k, v in run.data.tags.items() if k != PARENT_TAG}
    tags.update({SOURCE_TAG: run.info.run_id, STATE_TAG: "partial"})
    if parent:
        tags[PARENT_TAG] = parent
    new = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    run_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits
        dst.log_batch(run_id, params=params[i : i + 100])
    for key in run.data.metrics:
        history = src.get_metric_history(run.info.run_id, key)
        for i in range(0, len(history), 1000):
            dst.log_batch(run_id, metrics=history[i : i + 1000])
    if src.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory(prefix="headct-sync-") as scratch:
            local = src.download_artifacts(run.info.run_id, "", scratch)
            dst.log_artifacts(run_id, local)
    dst.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    dst.set_tag(run_id, STATE_TAG, "complete")
    return run_id


def sync(src_uri: str, dst_uri: str, experiments: list[str] | None = None) -> dict[str, Any]:
    """Copy SRC's finished runs (of `experiments`, default all) into DST once. Returns counts per outcome:
    copied, already (complete copies found), redone (partial copies replaced), unfinished (left for later)."""
    import mlflow
    from mlflow.entities import ViewType

    if src_uri == dst_uri:
        raise ValueError(f"tracking sync: source and destination are the same store ({src_uri})")
    src, dst = mlflow.MlflowClient(tracking_uri=src_uri), mlflow.MlflowClient(tracking_uri=dst_uri)
    counts = {"copied": 0, "already": 0, "redone": 0, "unfinished": 0, "experiments": 0}
    for exp in src.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if experiments is not None and exp.name not in experiments:
            continue
        runs = _all_runs(src, exp.experiment_id)
        if not runs:
            continue
        counts["experiments"] += 1
        target = dst.get_experiment_by_name(exp.name)
        dst_exp = target.experiment_id if target is not None else dst.create_experiment(
            exp.name, artifact_location=_artifact_root(dst_uri),
            tags={k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")})
        copies = {r.data.tags[SOURCE_TAG]: r for r in _all_runs(dst, dst_exp) if SOURCE_TAG in r.data.tags}
        mapping = {source: copy.info.run_id for source, copy in copies.items()}
        # Parents before children, so a child's parent tag can name the parent's copy.
        for run in sorted(runs, key=lambda r: (PARENT_TAG in r.data.tags, r.info.start_time or 0)):
            source = run.info.run_id
            if run.info.status in UNFINISHED:
                counts["unfinished"] += 1
                continue
            existing = copies.get(source)
            if existing is not None and existing.data.tags.get(STATE_TAG) == "complete":
                counts["already"] += 1
                continue
            if existing is not None:  # an interrupted sync's partial copy
                dst.delete_run(existing.info.run_id)
                counts["redone"] += 1
            else:
                counts["copied"] += 1
            parent = run.data.tags.get(PARENT_TAG)
            mapping[source] = _copy_run(src, dst, run, dst_exp, mapping.get(parent) if parent else None)
    return counts
