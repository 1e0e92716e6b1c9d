"""Store locks: one writer of a store at a time, or the shards of one job array side by side.

A whole `headct ingest` and `headct ingest merge` hold DEST's lock exclusively; a `--shard K/N` run holds it
shared (the shards of a Slurm job array write one DEST in parallel: volumes by scan_id, tables in their own
folders) and its shard's lock exclusively (the same shard twice is refused). The locks are OS file locks
(`fcntl.flock` on `DEST/ingest.lock` and `DEST/shards/<K>of<N>/shard.lock`), so the kernel releases them when
the holder ends, however it ends: a lock never goes stale. The lock files stay (empty: a store's bytes do not
depend on who wrote it); while a writer holds a lock, a holder file beside it (`<lock>.holder`, JSON: pid, host,
what, since) names it, so a second writer is told who holds the store. A holder file left by a killed run is
noted and replaced by the next writer; one naming a process of this host that no longer exists is marked gone.
flock works on local file systems and on NFSv4 (Linux emulates it with byte-range locks); on a file system
without locks the run stops with the error rather than writing unguarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from headct.errors import InputError

LOCK = "ingest.lock"
SHARD_LOCK = "shard.lock"
HOLDER_SUFFIX = ".holder"


def _holder_path(lock: Path) -> Path:
    return lock.with_name(lock.name + HOLDER_SUFFIX)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def describe_holder(lock: Path) -> str:
    """Who holds `lock`, from its holder file: 'pid N on host H (what, since T)', marked gone when the pid is
    of this host and no longer exists; or why that cannot be said."""
    try:
        info = json.loads(_holder_path(lock).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    gone = " - gone: that process no longer exists" if host == socket.gethostname() and not _alive(pid) else ""
    return f"pid {pid} on host {host} ({info.get('what', '?')}, since {since}){gone}"


def _flock(lock: Path, mode: int) -> int | None:
    """An open descriptor of `lock` holding `mode` (LOCK_EX / LOCK_SH), or None when another process holds a
    conflicting lock. The file is created when missing."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _record(lock: Path, what: str, warn: Callable[[str], None] | None) -> None:
    holder = _holder_path(lock)
    if holder.exists() and warn is not None:
        warn(f"an earlier writer of {lock.parent} ended without releasing it ({describe_holder(lock)}); "
             "its half-written work is redone or cleared by this run")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}
    tmp = holder.with_name(f"{holder.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, holder)


@contextlib.contextmanager
def writing(dest: Path, what: str, shard_folder: Path | None = None,
            warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold DEST for writing (module docstring): exclusively, or with `shard_folder` shared plus that shard's
    own lock. InputError naming the lock file and its holder when another writer has it. A DEST this call
    created and left holding nothing but its lock files is removed again."""
    created = not dest.exists()
    locks: list[tuple[Path, int]] = []
    wanted = [(dest / LOCK, fcntl.LOCK_SH if shard_folder else fcntl.LOCK_EX)]
    if shard_folder is not None:
        wanted.append((shard_folder / SHARD_LOCK, fcntl.LOCK_EX))
    try:
        for lock, mode in wanted:
            fd = _flock(lock, mode)
            if fd is None:
                holders = [describe_holder(lock)] if _holder_path(lock).exists() or lock.name == SHARD_LOCK else []
                if lock.name == LOCK:  # held shared: by shards, each recorded beside its own lock
                    holders += [describe_holder(p.with_name(SHARD_LOCK))
                                for p in sorted((dest / "shards").glob(f"*/{SHARD_LOCK}{HOLDER_SUFFIX}"))]
                raise InputError(f"{dest} is being written by another ingest: {lock} is held by "
                                 f"{'; '.join(holders) or 'another process'}. Wait for it to end, or write "
                                 "to another DEST")
            locks.append((lock, fd))
            if mode == fcntl.LOCK_EX:
                _record(lock, what, warn)
        yield
    finally:
        for lock, fd in reversed(locks):
            with contextlib.suppress(FileNotFoundError):
                if dict(wanted)[lock] == fcntl.LOCK_EX:
                    _holder_path(lock).unlink()
            os.close(fd)  # releases the lock; the empty lock file stays (waiters share its inode)
        if created:
            _remove_if_only_locks(dest)


def _remove_if_only_locks(dest: Path) -> None:
    """Remove a DEST holding nothing but lock files (a run that stopped before writing anything)."""
    try:
        entries = list(dest.rglob("*"))
    except OSError:
        return
    if any(p.is_file() and p.name not in (LOCK, SHARD_LOCK) for p in entries):
        return
    for path in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.unlink() if path.is_file() else path.rmdir()
    with contextlib.suppress(OSError):
        dest.rmdir()
