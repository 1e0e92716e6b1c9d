"""The HU plausibility test every converted series passes, and its one correction (headct/data/formats/hu.py):
negative HU stored as two's complement in pixels declared unsigned, undone only when the pattern is unambiguous.
(On real files through ingest: tests/test_rsna2019.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from headct.data.formats.hu import NotHuError, plausible
from headct.data.series import Series, SliceHeader, StackGeometry


def _stack(stored: np.ndarray, intercept: float, bits: int = 12, signed: bool = False) -> tuple[Series, StackGeometry]:
    headers = tuple(SliceHeader(
        path=Path(f"/x/{k}.dcm"), study_uid="s", series_uid="t", patient_id="p", modality="CT", image_type=(),
        sop_class_uid="", rows=stored.shape[1], cols=stored.shape[2], pixel_spacing=(1.0, 1.0),
        orientation=(1, 0, 0, 0, 1, 0), position=(0.0, 0.0, float(k)), frames=1, slice_thickness=None, kernel="",
        kvp=None, manufacturer="", body_part="", series_description="", contrast_agent="",
        rescale=(1.0, intercept), bits_stored=bits, pixel_signed=signed) for k in range(len(stored)))
    n = len(stored)
    geometry = StackGeometry(np.eye(3)[0], np.eye(3)[1], np.eye(3)[2], (1.0, 1.0), np.zeros((n, 3)),
                             np.arange(n, dtype=float), tuple(range(n)), stored.shape[1], stored.shape[2])
    return Series("s", "t", headers), geometry


def _head(n: int = 6, size: int = 40) -> np.ndarray:
    """HU: air around a disc of brain (35) in a ring of bone (1200)."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y)
    plane = np.where(r < size * 0.3, 35.0, np.where(r < size * 0.38, 1200.0, -1000.0))
    return np.repeat(plane[None], n, axis=0).astype(np.float32)


def test_plausible_hu_passes_untouched_and_wrapped_values_are_undone_only_when_unambiguous() -> None:
    hu = _head()
    series, geometry = _stack(hu + 1024, -1024.0)
    same, fix = plausible(hu, series, geometry, Path("/x"))
    assert fix == "" and same is hu  # plausible: not copied, not changed

    stored = np.mod(hu.astype(np.int64), 4096).astype(np.float32)  # 12-bit two's complement read as unsigned
    series, geometry = _stack(stored, 0.0)
    fixed, fix = plausible(stored, series, geometry, Path("/x"))
    assert fix == "signed_12bit" and np.array_equal(fixed, hu)
    padded = stored.copy()
    padded[:, :3, :] = -1024.0  # load_hu's pad_hu where a PixelPaddingValue was declared: left as it is
    fixed, fix = plausible(padded, series, geometry, Path("/x"))
    assert fix == "signed_12bit" and np.array_equal(fixed[:, 3:], hu[:, 3:]) and (fixed[:, :3] == -1024).all()
    series16, _ = _stack(stored, 0.0, bits=16)  # a 16-bit wrap would put air at +64536: this is not one
    with pytest.raises(NotHuError, match="read as signed 16-bit values too"):
        plausible(stored, series16, geometry, Path("/x"))
    signed, _ = _stack(stored, 0.0, signed=True)  # declared signed: no wrap of unsigned reading to undo
    with pytest.raises(NotHuError, match="does not declare unsigned"):
        plausible(stored, signed, geometry, Path("/x"))

    metal = np.where(hu == 1200.0, 2600.0, hu)  # bone at 2600 HU wraps to 2600: bone, or -1496 (below air)?
    stored = np.mod(metal.astype(np.int64), 4096).astype(np.float32)
    series, geometry = _stack(stored, 0.0)
    with pytest.raises(NotHuError, match="ambiguous") as caught:
        plausible(stored, series, geometry, Path("/x"))
    assert caught.value.reason == "not_hu"
    with pytest.raises(NotHuError, match="1st percentile"):  # stored values without their intercept
        plausible(hu + 1024, *_stack(hu + 1024, 0.0, bits=16), Path("/x"))
