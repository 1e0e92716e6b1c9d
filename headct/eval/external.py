"""Plug-in encoders: compare Merlin, CT-FM or your own model in the same harness.

Protocol (also in docs/contracts.md, "External encoders"): a factory named as `"pkg.module:factory"` (importable
from the environment `headct` runs in), called with no arguments, returns an object with
  * `preprocess`: a mapping with `"shape"`: [X, Y, Z] voxels, the canonical grid it expects, and `"version"`: the
    store preprocessing version it was made for (recorded in the cache's provenance; `headct extract` refuses a
    missing or different one unless `extract.allow_preprocess_mismatch`), optionally `"spacing_mm"`;
  * `embed(hu_volumes)`: (B, X, Y, Z) int16 Hounsfield-unit numpy array (RAS+, the store's canonical volumes,
    air = -1024) -> (B, D) float numpy array, the same D for every call. Windowing, normalisation and resizing
    are the encoder's own business.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from headct.errors import InputError


@runtime_checkable
class ExternalEncoder(Protocol):
    """What `headct extract` needs from an outside encoder."""

    preprocess: Mapping[str, Any]

    def embed(self, hu_volumes: np.ndarray) -> np.ndarray: ...


def load_external(spec: str) -> ExternalEncoder:
    """Import `pkg.module:factory`, call the factory and check the result against the protocol."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"external encoder {spec!r}: expected 'pkg.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise InputError(f"external encoder {spec!r}: cannot import {module_name} ({exc})") from None
    except AttributeError:
        raise InputError(f"external encoder {spec!r}: {module_name} has no attribute {attr!r}") from None
    encoder = factory()
    if not isinstance(encoder, ExternalEncoder):
        raise InputError(f"external encoder {spec!r}: the factory's result lacks `embed` or `preprocess`")
    shape = encoder.preprocess.get("shape") if isinstance(encoder.preprocess, Mapping) else None
    if shape is None or len(shape) != 3:
        raise InputError(f"external encoder {spec!r}: preprocess must name the grid as 'shape': [X, Y, Z]")
    return encoder


def checked_embed(encoder: ExternalEncoder, hu: np.ndarray, spec: str) -> np.ndarray:
    """encoder.embed(hu) as (B, D) finite float32; anything else is an InputError naming the encoder."""
    out = np.asarray(encoder.embed(hu))
    if out.ndim != 2 or len(out) != len(hu):
        raise InputError(f"external encoder {spec!r}: embed returned shape {out.shape} for {len(hu)} volumes")
    if not np.isfinite(out).all():
        raise InputError(f"external encoder {spec!r}: embed returned non-finite values")
    return out.astype(np.float32, copy=False)
