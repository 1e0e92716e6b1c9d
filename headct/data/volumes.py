"""The canonical volumes of a split as a torch Dataset, and a sampler whose order is a function of the step.

Volumes are int16 HU `.npy` files (X, Y, Z) read memory-mapped (a 64^3 volume is 512 KB, so the page cache
holds a whole demo store). Windowing and augmentation happen later, in batch, on the training device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from headct.errors import InputError


def read_volume_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a `.npy` volume without reading its voxels; InputError if it is not one."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: volume file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy volume ({exc})") from None
    return arr.shape, arr.dtype


class VolumeDataset(Dataset):
    """Item i -> (HU tensor (X, Y, Z) int16, scan_id).

    Args:
        paths: absolute `.npy` paths, one per scan.
        scan_ids: the pseudonymous scan ids, same order.
        shape: the expected (X, Y, Z) grid (from the store's preprocess spec); None skips that check.
    """

    def __init__(self, paths: Sequence[Path], scan_ids: Sequence[str], shape: Sequence[int] | None = None) -> None:
        if len(paths) != len(scan_ids):
            raise ValueError(f"{len(paths)} paths but {len(scan_ids)} scan ids")
        self.paths = [Path(p) for p in paths]
        self.scan_ids = [str(s) for s in scan_ids]
        self.shape = tuple(shape) if shape is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def check(self) -> None:
        """Read every header once, so a bad file stops the job before training rather than hours into it."""
        for path in self.paths:
            self._check(path, *read_volume_header(path))

    def _check(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype != np.int16:
            raise InputError(f"{path}: expected int16 HU, found {dtype}")
        if len(shape) != 3 or (self.shape is not None and shape != self.shape):
            raise InputError(f"{path}: expected shape {list(self.shape or ())} (X, Y, Z), found {list(shape)}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.paths[index]
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy volume ({exc})") from None
        self._check(path, mm.shape, mm.dtype)
        return torch.from_numpy(np.array(mm)), self.scan_ids[index]  # np.array: copy out of the mapping

    def load_all(self) -> torch.Tensor:
        """Every volume stacked -> (len, X, Y, Z) int16 (for small fixed sets such as an evaluation set)."""
        return torch.stack([self[i][0] for i in range(len(self))])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) used in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepBatchSampler(Sampler[list[int]]):
    """Yields the dataset indices of global steps start_step .. total_steps - 1, one list per step.

    The sample stream is the concatenation of per-epoch permutations; sample k of step s on rank r is stream
    position (s * world_size + r) * batch_size + k. A run resumed at step s therefore continues with exactly the
    samples an uninterrupted run would have seen, also mid-epoch and across epoch boundaries.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def step_indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch = pos // self.n
            if epoch != self._epoch:  # one permutation per epoch, cached
                self._epoch, self._order = epoch, epoch_order(self.n, self.seed, epoch)
            out.append(int(self._order[pos % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.step_indices(step)
