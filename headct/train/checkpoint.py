"""Training checkpoints for exact resume: written atomically, read back without unpickling code.

A checkpoint holds the model and optimizer state, the global step (schedules, sampler position and
augmentation/masking randomness are all functions of it), the RNG states, the run's config and a few
job-specific extras (e.g. the loss history). Every value is a tensor, number, string, list or dict, so
`torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headct.errors import InputError
from headct.io import atomic_path

FORMAT = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as weights_only-loadable values."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the state after `step` completed steps; the file appears whole or not at all."""
    state = {
        "format": FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


# What `restore` and `load_for_resume` read; `extra` may be empty
KEYS = ("format", "step", "model", "optimizer", "rng", "config", "extra")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (weights_only: no arbitrary code runs); InputError naming the file when it
    is unreadable, not a torch file, holds Python objects other than tensors and plain values (a pickle of some
    class: refused, never run), or lacks one of `KEYS` (named)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests weights_only=False, which would run whatever the file holds: name the cause only
        found = str(exc).split("Unsupported global: GLOBAL ", 1)
        what = (f"it holds a Python object ({found[1].split()[0]}) other than tensors and plain values, which is "
                "never unpickled here" if len(found) == 2 and found[1].split()
                else "the weights-only reader refused its pickle stream")
        raise InputError(f"{path}: not a headct checkpoint: {what}. Delete it or point to a headct checkpoint") \
            from None
    except Exception as exc:  # noqa: BLE001  junk makes torch's readers fail in many ways (KeyError, zip, EOF...)
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a headct checkpoint of format {FORMAT}")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise InputError(f"{path}: headct checkpoint without {missing} (written by an older or interrupted "
                         "writer?); delete it to start afresh")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every key whose value differs (keys missing on one side included)."""
    return [
        f"{key}: {saved.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load model, optimizer and RNG states from `state` (strict); returns the global step to continue from."""
    model.load_state_dict(state["model"], strict=True)
    marks = [group.get("decay") for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # torch replaces each group's settings with the saved ones
    for group, mark in zip(optimizer.param_groups, marks, strict=True):
        if mark is not None:  # a checkpoint written before groups were marked: keep the builder's mark
            group.setdefault("decay", mark)
    set_rng_state(state["rng"])
    return int(state["step"])


def load_for_resume(path: Path | None, identity: dict[str, Any], setting: str) -> dict[str, Any] | None:
    """The checkpoint at `path` for a run with this identity (`headct.run_identity`) to continue from; None when
    there is none. InputError when it was written by a run with another identity, naming each setting that
    differs and `setting` (the option that moves the checkpoint folder)."""
    if path is None or not Path(path).is_file():
        return None
    state = load_checkpoint(path)
    diffs = config_differences(state["config"], identity)
    if diffs:
        raise InputError(f"{path}: checkpoint of a different run ({'; '.join(diffs)}); delete it or set {setting} "
                         "elsewhere to start afresh")
    return state
