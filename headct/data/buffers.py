"""A reusable float32 buffer for the source stack of the series a process converts one after another.

A series' HU stack is the largest allocation of ingest (4 bytes x rows x cols x slices: 122 MB for 117 slices of
512 x 512). Allocated anew for every series, each of its pages is faulted in and zeroed by the kernel, and on a
virtual machine whose memory balloon reports freed pages to the host (this project's CPU machine) a page freed for
more than ~2 s costs the host a fault again: measured 0.5-1.5 s of system CPU time per 8 such series, against
~0.1 s when the storage is reused (issue 16). `stack` hands out the storage of the previous stack again when no
array refers to it any more (its reference count says so), so a caller can never see its array overwritten; `release`
drops it (ingest calls it when a run ends, so a process keeps nothing between runs). One thread per process.
"""

from __future__ import annotations

import sys

import numpy as np

_STORAGE: list[np.ndarray] = []  # at most one 1-D float32 array


def stack(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised C-contiguous float32 array of `shape`, on the storage of the previous one when nothing
    refers to that any more and it is large enough; else on a new one (which replaces it)."""
    n = int(np.prod(shape, dtype=np.int64))
    # references to a free storage: the list and getrefcount's argument; each live view of it adds one (a view's
    # base is the array owning the memory, however it was derived)
    if _STORAGE and _STORAGE[0].size >= n and sys.getrefcount(_STORAGE[0]) == 2:
        return _STORAGE[0][:n].reshape(shape)
    _STORAGE.clear()  # a storage still in use stays with its user
    _STORAGE.append(np.empty(n, np.float32))
    return _STORAGE[0].reshape(shape)


def release() -> None:
    """Forget the storage (freed once no array refers to it)."""
    _STORAGE.clear()
