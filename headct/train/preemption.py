"""Preemption-safe training: a trapped signal becomes a checkpoint at the next step boundary, then a requeue.

A scheduler that wants a node back warns the job with a signal first: Slurm sends SIGTERM (and SIGKILL `KillWait`
seconds later, 30 s by default) on preemption, `scancel`, or the time limit, and `#SBATCH --signal=USR1@120` asks it
for SIGUSR1 two minutes before the limit. `PreemptionGuard` (installed by the training jobs around their work)
catches SIGTERM and SIGUSR1 and only records the request: the handler never interrupts a step half way. The
engine (`headct.train.engine.train`) asks `stop_requested()` after every optimizer step; when it says yes, the
engine writes the job's atomic checkpoint of the completed steps and raises `Preempted`. The command line turns
that into `requeue()` (`scontrol requeue $SLURM_JOB_ID` when running under Slurm; `RequeueExit` is an admin
setting a job cannot rely on) and the exit status `EXIT_CODE`. The requeued job starts the same command, finds
the checkpoint of its run identity and continues from that step: schedules, sampler position and augmentation
noise are functions of the global step, so the losses it logs are those of an uninterrupted run.

Data parallel: every rank must stop at the same step (a rank that left would leave the others waiting in the
gradient all-reduce). Each rank's request is agreed with a MAX all-reduce of one integer after every step, over a
gloo group on the CPU, so a GPU job does not wait for its device each step. torchrun forwards only the signals in
`--signals-to-handle` (default SIGTERM, SIGINT, SIGHUP, SIGQUIT) to its workers, and SIGUSR1 would kill torchrun
itself: the Slurm templates pass `--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". What a preempted headct job exits
# with, whether or not it could requeue itself, so a wrapper script can tell "stopped to be resumed" from a failure.
EXIT_CODE = 75
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):  # noqa: N818  (a stop the job asked for, not an error)
    """Training stopped at a step boundary on a trapped signal, after its checkpoint was written (when the job
    has a checkpoint). `step`: completed global steps; `signal_name`: e.g. "SIGUSR1"; `checkpoint`: the file the
    next invocation resumes from, or None when the job keeps none (it then starts again)."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None = None) -> None:
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (this job keeps none; it starts again)"
        super().__init__(f"{signal_name} received: stopped after global step {step}; {where}")


_active: PreemptionGuard | None = None  # the guard of the running job, if any (at most one per process)
_gloo_group: Any = None  # CPU group for the per-step agreement when the main backend is not gloo


class PreemptionGuard:
    """Context manager: trap `signals` for its duration (previous handlers restored on exit). Only records the
    first signal's name (`received`); never raises inside a step. A no-op outside the main thread, where Python
    cannot install signal handlers (the job then dies of the signal as before, losing at most the steps since
    its last periodic checkpoint)."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> PreemptionGuard:
        global _active
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
            _active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if _active is self:
            _active = None


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: data workers ignore SIGUSR1 (`scancel --signal=USR1`, `--signal=USR1@T`
    reach every process of a step; a worker killed by it would crash the main process's next batch before it
    could checkpoint). SIGTERM keeps its default: multiprocessing's exit handler ends daemonic children with
    SIGTERM and then joins them, so a worker that ignored it kept its parent from ever exiting (a test process
    hung after its last test). A SIGTERM to the whole step (preemption without a warning signal) can therefore
    still end a worker first; request USR1 ahead of the grace period (docs/cluster.md)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def active() -> bool:
    """True while a job's guard is installed (the engine then checks for a stop after every step)."""
    return _active is not None


def stop_requested() -> str | None:
    """The trapped signal's name when training should stop now, else None. Under torch.distributed every rank
    must call it after the same step: the answer is agreed over ranks (any rank's signal stops all of them)."""
    import torch

    own = _active.received if _active is not None else None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return own
    global _gloo_group
    if dist.get_backend() != "gloo" and _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")  # collective: every rank creates it at the same step
    names = ("", *SIGNALS)
    flag = torch.tensor([names.index(own) if own in names else (1 if own else 0)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_gloo_group if dist.get_backend() != "gloo" else None)
    value = int(flag.item())
    return None if value == 0 else names[value]


def requeue(env: dict[str, str] | None = None) -> str:
    """Ask Slurm to run this job again (it returns to the queue and starts the same script from the top). Only
    the global rank 0 process asks, once per job. Returns what was done, for the job's last line."""
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not under Slurm: run the same command again to resume"
    if env.get("RANK", "0") != "0":
        return "rank 0 requeues the job"
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"  # the task, not the whole array
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False,
                             env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol requeue {job} failed ({exc}); resubmit the job to resume"
    if out.returncode != 0:
        return f"scontrol requeue {job} failed ({(out.stderr or out.stdout).strip()}); resubmit the job to resume"
    return f"requeued Slurm job {job}"
