"""Job `headct tune`: Optuna TPE over the fine-tuning learning rates and weight decay, on val only.

Each trial fine-tunes from the `finetune` section with `tune.epochs` epochs and suggested backbone_lr,
head_lr (log-uniform) and weight_decay (uniform); it reports the mean val AUROC after every epoch, and a
MedianPruner stops trials below the median of earlier trials at the same epoch. Trials are MLflow child runs of
the tune run. Test is never read.

Several processes may share one study (`storage`: SQLite by default, `sqlite:///<root>/optuna.db`, or any RDB
URL such as PostgreSQL for many machines, or `journal:/shared/path/study.journal`: Optuna's JournalStorage on a
file, for job arrays on a shared filesystem where SQLite is unsafe). Create the study (`create_study`) and the
MLflow store before starting workers at once: two processes creating a new SQLite database together can collide.
`n_trials` is the study's total: each process stops once the study holds that many trials (finished, pruned,
running or queued); two workers finishing at the same instant can overshoot by at most one trial each.
Preemption (SIGTERM/SIGUSR1, headct/train/preemption.py): the running trial stops at its next step and fails with
the user attribute `headct.preempted` (not counted); the next invocation enqueues it again with the same parameters
(`headct.retry_of`), so no finished trial is lost and the interrupted one is retried.

Outputs: `best_params` (YAML, `finetune:` backbone_lr / head_lr / weight_decay of the best trial so far, written
atomically; what `finetune.tuned_params` reads), report_dir/{metrics.json, trials.csv}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headct.config.base import JobContext
from headct.config.finetune import TUNED_KEYS, FinetuneConfig, TuneConfig
from headct.errors import InputError

TUNED = TUNED_KEYS
JOURNAL = "journal:"  # tune.storage = journal:/shared/path/study.journal -> Optuna's JournalStorage on that file


def storage_url(cfg: TuneConfig, root: Path) -> str:
    """`tune.storage` (a relative `journal:` path taken under the project root), or `sqlite:///<root>/optuna.db`."""
    if cfg.storage and cfg.storage.startswith(JOURNAL):
        return JOURNAL + str(Path(root).resolve() / Path(cfg.storage[len(JOURNAL):]).expanduser())
    return cfg.storage or f"sqlite:///{Path(root).resolve()}/optuna.db"


def _storage(url: str) -> Any:
    """An Optuna storage. `journal:PATH`: JournalStorage on an append-only file, the one for job-array tasks on a
    shared filesystem (NFS/Lustre/GPFS) without a database server (SQLite's locking is unsafe on NFS);
    JournalFileOpenLock, since symlink locks are not atomic on every network filesystem. Otherwise an RDB URL
    (PostgreSQL, MySQL, SQLite); SQLite waits up to 60 s for a lock held by another worker instead of failing."""
    import optuna
    from optuna.storages import journal

    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return journal.JournalStorage(journal.JournalFileBackend(
            str(path), lock_obj=journal.JournalFileOpenLock(str(path))))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


PREEMPTED_ATTR, RETRY_ATTR = "headct.preempted", "headct.retry_of"


def enqueue_retries(study: Any) -> list[int]:
    """Enqueue once, with the same parameters, every trial a preemption stopped (failed with PREEMPTED_ATTR) that
    no trial retries yet; returns their numbers. Two workers starting at the same instant could both enqueue one
    retry (Optuna has no atomic test-and-enqueue): the study then holds one extra trial, never loses one."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    todo = [t for t in trials if t.state == TrialState.FAIL and PREEMPTED_ATTR in t.user_attrs
            and t.number not in retried]
    for t in todo:
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: t.number})
    return [t.number for t in todo]


def auto_study_name(cfg: TuneConfig, base: FinetuneConfig) -> str:
    """"headct-finetune-<12 hex>": a hash of what the trials depend on (the trajectory settings of the tune section:
    search space, trial epochs, sampler and pruner; those of the finetune section less the tuned values; the model's
    weights and the split files; see headct.run_identity). Same inputs -> same study, so parallel workers join one;
    changed inputs -> a new study."""
    import hashlib
    import json

    from headct.io import file_sha256
    from headct.run_identity import trajectory_params

    finetune = {k: v for k, v in trajectory_params(base).items() if k not in TUNED}
    h = hashlib.sha256(json.dumps({"tune": trajectory_params(cfg), "finetune": finetune}, sort_keys=True,
                                  default=str).encode())
    for path in sorted([base.model_dir / "model.safetensors", *Path(base.splits).glob("*.csv")]):
        if path.is_file():
            h.update(path.name.encode())
            h.update(file_sha256(path).encode())
    return f"headct-finetune-{h.hexdigest()[:12]}"


def create_study(cfg: TuneConfig, root: Path, seed_offset: int = 0) -> Any:
    """Create (or, with load_if_exists, load) the study: maximise mean val AUROC, TPE + MedianPruner."""
    import optuna

    seed = None if cfg.seed is None else cfg.seed + seed_offset
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_epochs)
    try:
        return optuna.create_study(study_name=cfg.study_name, storage=_storage(storage_url(cfg, root)),
                                   sampler=sampler, pruner=pruner, direction="maximize",
                                   load_if_exists=cfg.load_if_exists)
    except optuna.exceptions.DuplicatedStudyError:
        raise InputError(f"study {cfg.study_name!r} exists in {storage_url(cfg, root)} and tune.load_if_exists "
                         "is false; choose another tune.study_name") from None


def _suggest(trial: Any, cfg: TuneConfig) -> dict[str, float]:
    return {
        "backbone_lr": trial.suggest_float("backbone_lr", *cfg.backbone_lr, log=True),
        "head_lr": trial.suggest_float("head_lr", *cfg.head_lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *cfg.weight_decay),
    }


def write_best_params(path: Path, study: Any) -> dict[str, Any]:
    """The best complete trial's values -> `path` (atomic YAML under `finetune:`); returns a summary."""
    import yaml

    from headct.io import write_text

    best = study.best_trial
    values = {k: float(best.params[k]) for k in TUNED}
    header = (f"# written by `headct tune`: study {study.study_name}, trial {best.number}, mean val AUROC "
              f"{best.value:.4f}\n# read by `headct finetune` (finetune.tuned_params); --set still wins\n")
    write_text(path, header + yaml.safe_dump({"finetune": values}, sort_keys=True))
    return {"trial": best.number, "value": best.value, "params": values}


def run(cfg: TuneConfig, ctx: JobContext, finetune: FinetuneConfig | None = None) -> dict[str, Any]:
    import optuna
    import torch
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from rich.console import Console
    from rich.table import Table

    from headct import tracking
    from headct.device import resolve_device
    from headct.headline import write_stage_headline
    from headct.io import atomic_path, write_json
    from headct.train.finetune_data import load_data, train_classifier
    from headct.train.preemption import Preempted, PreemptionGuard

    base = finetune or FinetuneConfig()
    if cfg.study_name is None:
        cfg = cfg.model_copy(update={"study_name": auto_study_name(cfg, base)})
    if base.threads:
        torch.set_num_threads(base.threads)
    device = resolve_device(base.device)
    data = load_data(base, ctx.root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    existing = create_study(cfg, ctx.root)
    # A different TPE seed per process joining a study, so concurrent workers do not propose the same values.
    study = create_study(cfg, ctx.root, seed_offset=len(existing.trials)) if existing.trials else existing

    with tracking.job_run(ctx.tracking, "tune", cfg, ctx.root, tags={"headct.study": cfg.study_name}) as mlrun:
        mlrun.log_params(base, prefix="finetune.")

        def objective(trial: optuna.Trial) -> float:
            values = _suggest(trial, cfg)
            trial_cfg = base.model_copy(update={**values, "epochs": cfg.epochs, "checkpoint_dir": None})
            pruned_at = None
            with mlrun.child(f"trial-{trial.number}", params={**values, "trial": trial.number}) as child:
                def on_epoch(epoch: int, record: dict[str, Any]) -> None:
                    child.log_metrics({"val_auroc_mean": record["val_auroc_mean"], "train_loss": record["train_loss"],
                                       **{f"val_auroc.{k}": v for k, v in record["val_auroc"].items()}}, step=epoch + 1)
                    trial.report(record["val_auroc_mean"], epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch + 1}: mean val AUROC {record['val_auroc_mean']:.4f}")

                try:
                    fitted = train_classifier(trial_cfg, ctx.root, data, device, epochs=cfg.epochs,
                                              on_epoch=on_epoch)[3]
                except optuna.TrialPruned as exc:
                    pruned_at = str(exc)
                except Preempted as exc:  # the trial fails; the next invocation retries it (enqueue_retries)
                    trial.set_user_attr(PREEMPTED_ATTR, f"{exc.signal_name} after step {exc.step}")
                    child.set_tags({"optuna.trial": trial.number, "optuna.state": "PREEMPTED"})
                    raise
                child.set_tags({"optuna.trial": trial.number,
                                "optuna.state": "PRUNED" if pruned_at else "COMPLETE"})
                if pruned_at is None:
                    child.log_metrics({"best_val_auroc_mean": fitted.best_val_auroc,
                                       "best_epoch": fitted.best_epoch + 1})
            if pruned_at is not None:
                raise optuna.TrialPruned(pruned_at)
            return fitted.best_val_auroc

        # A trial failed by a preemption is not counted (its retry is): finished, pruned, running and queued are.
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        with PreemptionGuard():  # SIGTERM/SIGUSR1: the running trial stops at its next step (exit 75)
            retries = enqueue_retries(study)
            if retries:
                Console().print(f"retrying trial(s) {retries} of study {cfg.study_name}, stopped by a preemption")
            # The callback only runs after a trial: a process joining a full study must not start one more.
            started = sum(t.state in counted[:3] for t in study.get_trials(deepcopy=False))
            if cfg.n_trials - started > 0:
                study.optimize(objective, n_trials=cfg.n_trials - started,
                               callbacks=[MaxTrialsCallback(cfg.n_trials, states=counted)], gc_after_trial=True)
        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials)
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        if not counts["complete"]:
            raise InputError(f"study {cfg.study_name!r} has no complete trial; nothing written to {cfg.best_params}")
        best = write_best_params(cfg.best_params, study)
        metrics = {"study": cfg.study_name, "storage": tracking.redact(storage_url(cfg, ctx.root)),
                   "best_trial": best["trial"], "best_val_auroc_mean": best["value"], "best_params": best["params"],
                   "trials": len(trials), **{f"trials_{k}": v for k, v in counts.items()}}
        write_json(cfg.report_dir / "metrics.json", metrics)
        write_stage_headline(cfg.report_dir, "tune", metrics)  # the DVC metric: a few numbers of it
        with atomic_path(cfg.report_dir / "trials.csv") as tmp:
            study.trials_dataframe().to_csv(tmp, index=False, lineterminator="\n")
        mlrun.log_metrics({"best_val_auroc_mean": best["value"], "trials": len(trials),
                           **{f"trials_{k}": v for k, v in counts.items()},
                           **{f"best.{k}": v for k, v in best["params"].items()}})
        for path in (cfg.best_params, cfg.report_dir / "metrics.json", cfg.report_dir / "trials.csv"):
            mlrun.log_artifact(path, "tune")

    table = Table(title=f"headct tune: study {cfg.study_name} (mean val AUROC, {cfg.epochs} epoch(s) per trial)")
    for name in ("trial", "state", "backbone_lr", "head_lr", "weight_decay", "val AUROC"):
        table.add_column(name, justify="right")
    for t in trials:
        table.add_row(str(t.number) + (" *" if t.number == best["trial"] else ""), t.state.name.lower(),
                      *(f"{t.params[k]:.3g}" if k in t.params else "-" for k in TUNED),
                      f"{t.value:.4f}" if t.value is not None else "-")
    console = Console()
    console.print(table)
    console.print(f"best parameters -> {cfg.best_params} (read by `headct finetune`)")
    return metrics
