"""Atomic file writing: nothing half-written is ever left at a destination path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, on error removed.

    The temp file lives in the same folder so the final `os.replace` is atomic on POSIX.
    `suffix` keeps writers that infer the format from the name (np.save, PIL) happy.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".tmp" + (suffix or dest.suffix), dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the final file the mode a plain open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


# A temp file of `atomic_path`: "." + the destination's name + "." + mkstemp's 8 random characters + ".tmp..."
_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\..*)?")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files `atomic_path` left in `folder` (not below it) when its process was killed between
    writing a file and renaming it into place (SIGKILL, power loss: no `finally` runs). Only for a folder with
    one writer at a time (a job's own output folder), where no other process can be mid-write. Returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if _TEMP.fullmatch(p.name) and p.is_file()]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (volumes, weights, split files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
