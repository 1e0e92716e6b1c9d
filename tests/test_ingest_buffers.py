"""The reusable stack buffer (headct.data.buffers): reused only when no array refers to it, never overwriting one."""

from __future__ import annotations

import numpy as np

from headct.data import buffers


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_the_storage_is_reused_once_nothing_refers_to_it() -> None:
    buffers.release()
    first = buffers.stack((3, 4, 5))
    first[...] = 7.0
    held = buffers.stack((3, 4, 5))  # `first` is still held: a new storage, `first` untouched
    held[...] = 1.0
    assert not np.shares_memory(first, held) and (first == 7.0).all()
    del first, held
    again = buffers.stack((2, 4, 5))  # smaller: the last storage again
    assert again.shape == (2, 4, 5) and again.dtype == np.float32 and again.flags.c_contiguous
    reused = _address(again)  # `held`'s storage: the first one was replaced when `held` was made
    del again
    assert _address(buffers.stack((2, 4, 5))) == reused
    buffers.release()


def test_a_view_kept_of_a_stack_keeps_its_storage_from_reuse() -> None:
    buffers.release()
    stack = buffers.stack((4, 6, 6))
    stack[...] = np.arange(stack.size, dtype=np.float32).reshape(stack.shape)
    plane = stack[2][::2]  # a view of a view: it refers to the storage, not to `stack`
    expected = plane.copy()
    del stack
    other = buffers.stack((4, 6, 6))
    other[...] = -1.0
    assert not np.shares_memory(plane, other) and np.array_equal(plane, expected)
    del other, plane
    buffers.release()


def test_a_larger_stack_gets_a_new_storage_and_release_forgets_it() -> None:
    buffers.release()
    small = buffers.stack((2, 2, 2))
    del small
    large = buffers.stack((5, 5, 5))  # the small storage cannot hold it
    assert large.size == 125 and large.base.size == 125
    address = _address(large)
    del large
    assert _address(buffers.stack((5, 5, 5))) == address
    buffers.release()
    assert buffers._STORAGE == []
