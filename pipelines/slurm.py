"""`headct slurm ingest|pretrain|tune`: submit the templates in slurm/ with values from params.yaml.

What it submits is what a user would type: `sbatch` with resource options from the `slurm` section and the
templates' HEADCT_* variables in its environment (sbatch exports the submitting environment to the job, so values
may hold commas and spaces, unlike `--export=A=b`). `--params` and `--set` given to `headct slurm` reach the jobs
(HEADCT_ARGS), so they run with the configuration that was shown. `dry_run` prints the commands and submits
nothing.

  ingest:   the array (one task per shard, `--shard K/N`) and the merge, which waits for the whole array
            (--dependency=afterok) and joins the shards into ingest.dest
  pretrain: one job of slurm.pretrain.nodes nodes, one torchrun per node, rendezvous on the first
  tune:     an array of slurm.tune.tasks workers sharing one Optuna study (JournalStorage or PostgreSQL)
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from headct.config.base import JobContext
from headct.config.slurm import SlurmConfig, SlurmJob
from headct.errors import InputError

KINDS = ("ingest", "pretrain", "tune")


def _common(cfg: SlurmConfig, name: str) -> list[str]:
    log_dir = cfg.log_dir
    opts = [f"--output={log_dir}/%x-{'%A_%a' if name in ('ingest', 'tune') else '%j'}.out"]
    opts += [f"--{key}={value}" for key, value in (("partition", cfg.partition), ("account", cfg.account),
                                                  ("qos", cfg.qos)) if value]
    return opts + list(cfg.sbatch_args)


def _resources(job: SlurmJob) -> list[str]:
    return [f"--cpus-per-task={job.cpus_per_task}", f"--mem={job.mem}", f"--time={job.time}"]


def _job_args(params_file: Path | None, overrides: list[str]) -> str:
    """HEADCT_ARGS: --params and every --set but the `slurm` section's (the submission's own). The templates split
    it on whitespace, so a value holding a space or shell character is refused here."""
    jobs = [o for o in overrides if not o.strip().startswith("slurm.")]
    args = [*(["--params", str(params_file)] if params_file else []), *(a for o in jobs for a in ("--set", o))]
    spaced = [a for a in args if not a or any(c.isspace() for c in a) or a != shlex.quote(a)]
    if spaced:
        raise InputError(f"headct slurm: {spaced[0]!r} holds a space or shell character, which the templates' "
                         "HEADCT_ARGS cannot carry; put the value in params.yaml instead")
    return " ".join(args)


def commands(cfg: SlurmConfig, ctx: JobContext, kind: str, *, params_file: Path | None = None,
             overrides: list[str] | None = None, ingest_dest: Path | None = None) -> list[dict[str, Any]]:
    """The sbatch calls for `kind`: [{"argv", "env"}], in submission order; "{previous}" in an argv stands for the
    job id of the call before it."""
    if kind not in KINDS:
        raise InputError(f"headct slurm: unknown job {kind!r}; one of {', '.join(KINDS)}")
    template = lambda name: str(cfg.templates / name)  # noqa: E731
    env = {"HEADCT_PROJECT": str(ctx.root)}
    env.update({k: v for k, v in (("HEADCT_EXEC", cfg.exec_prefix), ("HEADCT_SETUP", cfg.setup)) if v})
    args = _job_args(params_file, overrides or [])
    if args:
        env["HEADCT_ARGS"] = args
    base = ["sbatch", "--parsable", *_common(cfg, kind)]
    if kind == "ingest":
        job = cfg.ingest
        array = [*base, f"--array=1-{job.shards}", *_resources(job), template("ingest-array.sbatch")]
        merge_env = {**env, "HEADCT_DEST": str(ingest_dest)}
        merge = ["sbatch", "--parsable", *_common(cfg, "merge"), "--dependency=afterok:{previous}",
                 f"--cpus-per-task={job.merge_cpus}", f"--mem={job.merge_mem}", f"--time={job.merge_time}",
                 template("ingest-merge.sbatch")]
        return [{"argv": array, "env": env}, {"argv": merge, "env": merge_env}]
    if kind == "pretrain":
        job = cfg.pretrain
        gpus = [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
        env.update(HEADCT_NPROC_PER_NODE=str(max(job.gpus_per_node, 1)), HEADCT_RDZV_PORT=str(job.rdzv_port))
        argv = [*base, f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}", *gpus, *_resources(job),
                f"--signal=USR1@{job.signal_lead_s}", template("pretrain.sbatch")]
        return [{"argv": argv, "env": env}]
    job = cfg.tune
    env.update({k: v for k, v in (("HEADCT_STORAGE", job.storage), ("HEADCT_STUDY", job.study)) if v})
    gpus = [f"--gpus-per-task={job.gpus_per_task}"] if job.gpus_per_task else []
    argv = [*base, f"--array=1-{job.tasks}", *gpus, *_resources(job), template("tune-array.sbatch")]
    return [{"argv": argv, "env": env}]


def shown(call: dict[str, Any]) -> str:
    """The call as a shell line: VAR=value ... sbatch ..."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in call["env"].items()), *map(shlex.quote, call["argv"])])


def submit(cfg: SlurmConfig, ctx: JobContext, request: list[Any], ingest: Any = None) -> dict[str, Any]:
    """request = [kind, dry_run, params_file, overrides]: print and (unless dry_run) run the sbatch calls from the
    project root. Returns {"kind", "commands", "job_ids"}."""
    from rich.console import Console

    kind, dry_run, params_file, overrides = request
    calls = commands(cfg, ctx, kind, params_file=params_file, overrides=overrides,
                     ingest_dest=getattr(ingest, "dest", None))
    console = Console(highlight=False, soft_wrap=True)
    for name in {Path(c["argv"][-1]) for c in calls}:
        if not (ctx.root / name).is_file():
            raise InputError(f"{ctx.root / name}: template not found (slurm.templates = {cfg.templates})")
    ids: list[str] = []
    for call in calls:
        argv = [a.replace("{previous}", ids[-1] if ids else "<previous job id>") for a in call["argv"]]
        console.print(shown({**call, "argv": argv}), markup=False)
        if dry_run:
            continue
        (ctx.root / cfg.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create it
        try:
            out = subprocess.run(argv, cwd=ctx.root, env={**os.environ, **call["env"]}, capture_output=True,
                                 text=True, timeout=120, check=False)
        except FileNotFoundError:
            raise InputError("headct slurm: sbatch not found on PATH (run this on a Slurm login node)") from None
        if out.returncode != 0:
            raise InputError(f"headct slurm {kind}: sbatch failed ({out.returncode}): {out.stderr.strip()}")
        ids.append(out.stdout.strip().split(";")[0])  # --parsable: "id" or "id;cluster"
        console.print(f"submitted job {ids[-1]}", markup=False)
    return {"kind": kind, "commands": [shown(c) for c in calls], "job_ids": ids}
