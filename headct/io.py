"""Atomic file writing: nothing half-written is ever left at a destination path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
