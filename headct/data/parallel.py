"""Worker processes for ingest, and how many of them memory allows.

Peak memory of converting one series in a worker (measured terms, bytes):
    source stack     4 x rows x cols x slices       float32 HU (a format's load_hu)
    decode buffer    2 x rows x cols x slices       only for an uncompressed multi-frame file or a NIfTI, whose
                                                    stored array is read whole; single-frame DICOM adds one slice
                     (these two are the format's own estimate: InputFormat.source_bytes, headct.data.formats)
    output           2 x 4 x X x Y x Z               float32 canonical grid, then its int16 copy
    scratch          ~80 MB                          coordinate slabs of the chunked resampler (resample.py)
    process          ~250 MB                         Python with numpy, scipy, pydicom, pandas imported
A 1,000-slice 512 x 512 series thus needs about 1.05 GB of stack (+0.5 GB as one multi-frame file), 1.4 GB in all;
a 96^3 output adds 7 MB. Measured: 1.36 GB peak RSS for a fresh process ingesting one such series.
The worker count is capped so that (workers x the largest series' estimate) fits in 80 % of available memory.
One series whose estimate alone exceeds that (80 % of the memory available when the run starts, `series_limit`)
is rejected `too_large` at QC, from its header, before any pixel is decoded (`memory_check`): a series larger
than the machine is a rejects.csv row, not an out-of-memory kill of the run.

Workers are forked from a forkserver (where the platform has one: Linux, macOS) that imported ingest's modules
once (`PRELOAD`): a worker starts in milliseconds instead of importing numpy, scipy, pandas and pydicom anew for
~0.85 s, which on a small ingest cost more than the parallel work saved (issue 16). The server is a fresh process
started by the first pool (`warm` starts it early, while the parent lists files) and serves every later pool of
this process. Elsewhere workers are spawned. Either way a worker gets the parent's sys.path and working folder;
it inherits the environment of the process that started the server.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from headct.config.base import PreprocessSpec
from headct.data import formats
from headct.data.qc import QcResult
from headct.data.series import Series

# what an ingest worker imports (convert_study, read_headers, the formats, content hashing), once, in the server
PRELOAD = ("headct.data.convert", "headct.data.discovery", "headct.data.formats", "nibabel.orientations")
PROCESS_BYTES = 250 * 2**20
SCRATCH_BYTES = 80 * 2**20
MEMORY_FRACTION = 0.8  # leave the rest to the OS, the parent process and page cache


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# cgroup v2, then v1: (limit, usage, memory.stat key of the reclaimable page cache)
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                  "total_inactive_file"))


def cgroup_room(files: tuple[tuple[str, str, str], ...] = _CGROUP_FILES) -> int | None:
    """Bytes this process's memory cgroup (a container's `--memory`, a Slurm job's allocation) may still use: its
    limit minus its working set (usage less reclaimable page cache, as Kubernetes counts it); None without a
    limit. psutil reports the host's memory inside a container, while the kernel kills at the cgroup's limit."""
    for limit_file, usage_file, cache_key in files:
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
            stat = dict(line.split() for line in Path(limit_file).with_name(
                "memory.stat").read_text().splitlines() if len(line.split()) == 2)
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge page-aligned number
            return None
        return max(0, int(limit) - max(0, usage - int(stat.get(cache_key, 0))))
    return None


def available_memory() -> int:
    """Memory this process can still get (bytes): the host's available memory, or less where a cgroup limits it."""
    import psutil

    host = int(psutil.virtual_memory().available)
    room = cgroup_room()
    return host if room is None else min(host, room)


def series_bytes(series: Series, spec: PreprocessSpec) -> int:
    """Estimated peak bytes of converting `series` (module docstring)."""
    x, y, z = spec.shape
    return formats.of(series).source_bytes(series) + 8 * x * y * z + SCRATCH_BYTES + PROCESS_BYTES


def series_limit(available: int | None = None) -> int:
    """The most bytes converting one series may need: MEMORY_FRACTION of the memory available now."""
    return int((available_memory() if available is None else available) * MEMORY_FRACTION)


def memory_check(series: Series, qc: QcResult, spec: PreprocessSpec, limit: int) -> QcResult:
    """`qc` of a series that passed its checks, turned into `too_large` when converting it would need more than
    `limit` bytes (`series_bytes`, from the header: rows x columns x slices, or a NIfTI's shape); else `qc`."""
    if qc.reason is not None:
        return qc
    need = series_bytes(series, spec)
    if need <= limit:
        return qc
    files = {s.path for s in series.slices}
    return QcResult("too_large", f"converting it needs ~{need / 2**30:.1f} GiB by its header, beyond the "
                                 f"{limit / 2**30:.1f} GiB one series may use ({MEMORY_FRACTION:.0%} of the memory "
                                 "available when the run started)",
                    path=series.first.path if len(files) == 1 else None)  # one file (a NIfTI): named, not its folder


def choose_workers(requested: int | str, largest_bytes: int, available: int | None = None) -> tuple[int, str]:
    """(workers, a sentence saying why) for `requested` ("auto" = CPU count), never more than memory allows."""
    available = available_memory() if available is None else available
    wanted = cpu_count() if requested == "auto" else int(requested)
    allowed = max(1, int(available * MEMORY_FRACTION) // max(largest_bytes, 1))
    workers = max(1, min(wanted, allowed))
    why = (f"{workers} worker(s): requested {requested}, memory allows {allowed} "
           f"(largest series ~{largest_bytes / 2**20:.0f} MB each, {available / 2**30:.1f} GB available)")
    return workers, why


Runner = Callable[..., Iterator[tuple[Any, Any]]]


def context() -> multiprocessing.context.BaseContext:
    """forkserver with `PRELOAD` where the platform has it, else spawn (module docstring)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (once per process)
    return ctx


def warm(n: int) -> None:
    """Start the forkserver now when `n` workers will be needed, so its imports overlap the caller's own work."""
    ctx = context()
    if n > 1 and ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


@contextlib.contextmanager
def pool(n: int, setup: Callable[..., Any] | None = None, setup_args: tuple = ()) -> Iterator[Runner]:
    """`run(fn, tasks, in_flight=None)` yielding (task, fn(*task)) as they finish, with at most `in_flight`
    tasks submitted at once (the memory cap): in a spawn process pool, or inline for n=1.
    `setup(*setup_args)` runs once in each worker process first (e.g. installing the parent's input formats).

    forkserver or spawn, never fork: the parent runs rich's refresh thread, and forking a threaded process can
    deadlock (the forkserver is single-threaded). On an error or Ctrl-C the queued tasks are cancelled instead
    of run to the end.
    """
    if n == 1:
        yield lambda fn, tasks, in_flight=None: ((task, fn(*task)) for task in tasks)
        return
    executor = ProcessPoolExecutor(n, mp_context=context(), initializer=setup, initargs=setup_args)

    def run(fn: Callable[..., Any], tasks: list[tuple], in_flight: int | None = None) -> Iterator[tuple[Any, Any]]:
        limit = max(1, min(n, in_flight or n))
        pending: dict[Any, tuple] = {}
        queue = iter(tasks)
        while True:
            while len(pending) < limit:
                task = next(queue, None)
                if task is None:
                    break
                pending[executor.submit(fn, *task)] = task
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()

    try:
        yield run
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
