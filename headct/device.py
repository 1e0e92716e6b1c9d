"""Which torch device a job runs on (torch is imported inside, so importing this module stays light)."""

from __future__ import annotations

from typing import Any

from headct.errors import InputError


def resolve_device(name: str) -> Any:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an InputError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)
