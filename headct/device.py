"""Which torch device a job runs on, and in which precision (torch is imported inside, so importing this module
stays light)."""

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


def amp_dtype(amp: str, device: Any) -> Any:
    """The autocast dtype of a job's `amp` setting on `device`: "bf16" -> torch.bfloat16 anywhere; "auto" ->
    torch.bfloat16 on CUDA and None (full fp32) elsewhere (bf16 on CPU is slower than fp32 here); "off" -> None.
    bf16 keeps fp32's exponent range, so no loss scaling is needed."""
    import torch

    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    if amp == "bf16" or (amp == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None
