"""Reading canonical volumes: the one checked reader, the torch Datasets over a split, and step-indexed samplers.

Every job that reads a store's volumes (pre-training, feature extraction, fine-tuning, explanations, prediction)
goes through `load_volume`, which holds each file to the store's contract (docs/contracts.md): the file is
`<store>/volumes/<scan_id>.npy`, its scan is in the store's manifest with the store's preprocessing version, its
bytes have the SHA-256 the manifest recorded when ingest wrote it, and it is an int16 (X, Y, Z) array on the
store's grid. Anything else is an InputError naming the file (whose name is the scan's pseudonym) and the reason,
so a volume changed after ingest, left over from another run, or made with another recipe never reaches a model.

The hash is checked on the first read of a file in a process and again whenever its inode, size or mtime change
(an atomic rewrite changes the inode), so an epoch loop does not re-hash every volume every epoch. Windowing and
augmentation happen later, in batch, on the training device.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from headct.data.store import MANIFEST, PREPROCESS, VOLUMES, StoreIndex, store_index
from headct.errors import InputError

_VERIFIED: set[tuple[str, int, int, int]] = set()  # (path, inode, size, mtime_ns) whose bytes matched the manifest


def store_of_volume(path: Path) -> Path:
    """`<store>/volumes/<scan_id>.npy` -> `<store>`; InputError for a file outside that layout."""
    path = Path(path)
    if path.parent.name != VOLUMES or path.suffix != ".npy":
        raise InputError(f"{path}: not a canonical store volume (expected <store>/{VOLUMES}/<scan_id>.npy)")
    return path.parent.parent


def _indexed(path: Path, scan_id: str | None, version: str | None) -> tuple[StoreIndex, str]:
    """The store index of `path` and the manifest's SHA-256 of it, after the checks that need no voxels."""
    store = store_of_volume(path)
    if not path.is_file():
        raise InputError(f"{path}: volume file not found")
    index = store_index(store)
    name = path.stem
    if scan_id is not None and str(scan_id) != name:
        raise InputError(f"{path}: the split names this file as scan {scan_id!r}; the store names it {name!r}")
    entry = index.volumes.get(name)
    if entry is None:
        raise InputError(f"{path}: scan {name} is not in {store / MANIFEST} (a file the store does not list; "
                         "re-run `headct ingest`)")
    _, sha, row_version = entry
    if row_version != index.version:
        raise InputError(f"{path}: scan {name} was made with preprocessing {row_version}, but {store / PREPROCESS} "
                         f"is {index.version}; re-run `headct ingest`")
    if version is not None and version != index.version:
        raise InputError(f"{store / PREPROCESS}: preprocessing version {index.version} differs from the model's "
                         f"{version}; re-ingest with the model's preprocess spec")
    return index, sha


def _check_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, index: StoreIndex,
                 expected: Sequence[int] | None) -> None:
    if dtype != np.int16 or len(shape) != 3:
        raise InputError(f"{path}: expected a 3-D int16 HU volume, got {dtype} with shape {list(shape)}")
    if shape != index.shape:
        raise InputError(f"{path}: shape {list(shape)} differs from the store's grid {list(index.shape)} "
                         f"({index.folder / PREPROCESS})")
    if expected is not None and shape != tuple(expected):
        raise InputError(f"{path}: shape {list(shape)} differs from the model's preprocessing grid "
                         f"{list(expected)}; re-ingest with the model's preprocess spec")


def load_volume(path: Path, scan_id: str | None = None, *, shape: Sequence[int] | None = None,
                version: str | None = None) -> np.ndarray:
    """One canonical volume, checked against its store: int16 HU, array axes (x, y, z).

    Args:
        path: `<store>/volumes/<scan_id>.npy` (a split file's `img_path` under the project root).
        scan_id: the scan id the caller's table gives this file (checked against the file name), if any.
        shape: the grid the caller's model expects (beside the store's own grid, always checked).
        version: the preprocessing version the caller's model was trained with, if known.
    Raises:
        InputError naming the file and the reason (see the module docstring for what is checked).
    """
    path = Path(path)
    index, sha = _indexed(path, scan_id, version)
    try:
        st = os.stat(path)
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            volume = np.load(path, allow_pickle=False)
        else:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha:
                raise InputError(f"{path}: SHA-256 {digest[:12]}... differs from the manifest's {sha[:12]}... for "
                                 f"scan {path.stem} (the file changed after ingest); re-run `headct ingest`")
            volume = np.load(io.BytesIO(data), allow_pickle=False)
            _VERIFIED.add(key)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy volume ({exc})") from None
    _check_array(path, tuple(volume.shape), volume.dtype, index, shape)
    return volume


def check_volume(path: Path, scan_id: str | None = None, *, shape: Sequence[int] | None = None,
                 version: str | None = None) -> None:
    """`load_volume`'s checks that need only the manifest and the .npy header (no voxels are read or hashed):
    for checking a whole training set before hours of training rather than in the middle of it."""
    path = Path(path)
    index, _ = _indexed(path, scan_id, version)
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy volume ({exc})") from None
    _check_array(path, tuple(header.shape), header.dtype, index, shape)


def split_store(split_dir: Path, root: Path) -> Path:
    """The store a split's volumes are in: the one split.json names, else (a split brought from elsewhere) the one
    holding its first train scan. InputError when neither can be told."""
    from headct.data.splits import read_split, store_of_split

    store = store_of_split(split_dir, root)
    if store is not None:
        return store
    train = read_split(split_dir, "train")
    if train.empty:
        raise InputError(f"{Path(split_dir) / 'train.csv'}: no scans, and no split.json naming the store")
    return store_of_volume(Path(root) / train["img_path"].iloc[0])


def check_preprocessing(split_dir: Path, root: Path, model_config: dict[str, Any], source: Path | str, *,
                        allow_mismatch: bool = False, setting: str = "allow_preprocess_mismatch") -> str | None:
    """The store behind a split (`split_store`) must have been made with the model's preprocessing recipe: the
    version recorded in `model_config["preprocess"]` (a model directory's config.json, or an external encoder's
    `preprocess` mapping), read from `source` (named in messages).

    A model with no recorded version, or with another version than the store's, is an InputError naming both and
    `setting`, the override. With `allow_mismatch` (the user's explicit choice) the same message is printed as a
    warning instead and returned; the job goes on (each volume is still checked against the model's grid).
    Returns None when the versions match."""
    from headct.data.store import read_preprocess

    store = split_store(split_dir, root)
    store_version = read_preprocess(store)["version"]
    preprocess = model_config.get("preprocess")
    model_version = preprocess.get("version") if isinstance(preprocess, dict) else None
    if model_version is not None and str(model_version) == store_version:
        return None
    if model_version is None:
        problem = (f"{source}: no preprocess version recorded, so nothing says the model was trained on volumes "
                   f"like those of {store / PREPROCESS} (version {store_version})")
    else:
        problem = (f"{store / PREPROCESS}: preprocessing version {store_version} differs from the model's "
                   f"{model_version} ({source})")
    if not allow_mismatch:
        raise InputError(f"{problem}; re-ingest with the model's preprocess spec, or set {setting}: true to use "
                         "it anyway")
    from rich.console import Console

    message = f"{problem}; going on because {setting} is true"
    Console(stderr=True).print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    return message


# ----------------------------------------------------------------------------------------------- datasets
class VolumeDataset(Dataset):
    """Item i -> (HU tensor (X, Y, Z) int16, scan_id), read through `load_volume`.

    Args:
        paths: absolute `.npy` paths, one per scan.
        scan_ids: the pseudonymous scan ids, same order.
        shape: the grid the model expects (the store's own grid is always checked); None: the store's.
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
        """Check every scan against its store's manifest and every .npy header once, so a bad file stops the
        job before training rather than hours into it (`check_volume`)."""
        for path, scan_id in zip(self.paths, self.scan_ids, strict=True):
            check_volume(path, scan_id, shape=self.shape)

    def volume(self, index: int) -> torch.Tensor:
        return torch.from_numpy(load_volume(self.paths[index], self.scan_ids[index], shape=self.shape))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.volume(index), self.scan_ids[index]

    def load_all(self) -> torch.Tensor:
        """Every volume stacked -> (len, X, Y, Z) int16 (for small fixed sets such as an evaluation set)."""
        return torch.stack([self.volume(i) for i in range(len(self))])


class LabelledVolumeDataset(VolumeDataset):
    """Item i -> (HU tensor (X, Y, Z) int16, targets (L,) float32 with NaN = unknown)."""

    def __init__(self, paths: Sequence[Path], scan_ids: Sequence[str], targets: np.ndarray,
                 shape: Sequence[int] | None = None) -> None:
        super().__init__(paths, scan_ids, shape)
        if len(targets) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(targets)} target rows")
        self.targets = np.asarray(targets, np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.volume(index), torch.from_numpy(self.targets[index])


# ----------------------------------------------------------------------------------------------- samplers
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


def class_balanced_weights(targets: np.ndarray) -> np.ndarray:
    """(n, L) targets (NaN unknown) -> (n,) sampling probabilities: each scan weighs 1 / (share of its class) for
    the label where that is largest (its rarest class), so every label's minority class is drawn about as often
    as its majority. Unknown values do not count."""
    weights = np.ones(len(targets))
    for column in np.asarray(targets).T:
        known = ~np.isnan(column)
        for value in (0.0, 1.0):
            members = known & (column == value)
            if members.any():
                weights[members] = np.maximum(weights[members], known.sum() / members.sum())
    return weights / weights.sum()


class WeightedStepSampler(Sampler[list[int]]):
    """Indices of steps start_step .. total_steps - 1, drawn with replacement from `probabilities`; step s's
    draw is a function of (seed, stream, s) only, so, as for `StepBatchSampler`, a resumed run draws what an
    uninterrupted one would have."""

    def __init__(self, probabilities: np.ndarray, batch_size: int, seed: int, start_step: int, total_steps: int,
                 stream: int = 0) -> None:
        self.p, self.batch_size, self.seed, self.stream = probabilities, batch_size, seed, stream
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            rng = np.random.default_rng([self.seed, self.stream, step])
            yield rng.choice(len(self.p), size=self.batch_size, replace=True, p=self.p).tolist()
