"""One study's conversion (run in an ingest worker process): the first usable candidate series, best first ->
HU stack -> canonical grid -> `volumes/<scan_id>.npy`, and the check made on the result: how much of the head the
grid crops (`ingest.qc.max_crop_mm`, reason code `head_cropped`).

A canonical grid has a fixed field of view (shape x spacing, 192 mm by default) centred on the head's bounding
box; a head longer than that along an axis loses the excess at both ends. That extent is measured per RAS axis
(`headct.data.resample.cropped_mm`), recorded in the manifest (`store.CROP_COLUMNS`) and
judged here, before the volume is written, so a badly cropped series is never stored and the study's next-ranked
series is tried instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headct.config.base import PreprocessSpec
from headct.data import dedup, formats, guards, store
from headct.data.formats import SourceDataError
from headct.data.formats.hu import plausible
from headct.data.resample import NoHeadError, to_canonical
from headct.data.series import Series, StackGeometry

AXES = "xyz"


@dataclass(frozen=True)
class Attempt:
    """The outcome of converting one candidate series (returned from a worker process)."""

    scan_id: str
    reason: str | None  # None: converted
    message: str  # safe for rejects.csv
    terminal: str  # the details, for the user's terminal only (may quote source text), about `path`
    volume: dict[str, Any] | None  # affine (16 floats), spacing_mm, volume_sha256, content_sha256, crop_mm
    path: Path | None = None  # the source file or folder at fault (ingest names it relative to SRC)


Candidate = tuple[str, Series, StackGeometry, "dict[str, Any] | None"]  # scan_id, series, geometry, reusable facts


def crop_problem(crop_mm: list[float], spec: PreprocessSpec, max_crop_mm: float | None) -> str | None:
    """Why a volume whose head was cropped by `crop_mm` (x, y, z) breaks the `max_crop_mm` rule, or None."""
    if max_crop_mm is None:
        return None
    over = [(axis, mm) for axis, mm in zip(AXES, crop_mm, strict=True) if mm > max_crop_mm]
    if not over:
        return None
    fov = [round(n * spec.spacing_mm, 1) for n in spec.shape] if spec.fit == "isotropic" else None
    what = ", ".join(f"{mm:.1f} mm along {axis}" for axis, mm in over)
    return (f"the head extends beyond the canonical grid by {what} (max_crop_mm {max_crop_mm:g}"
            + (f"; field of view {fov} mm" if fov else "") + ")")


def convert_study(candidates: list[Candidate], spec: PreprocessSpec, dest: Path,
                  max_crop_mm: float | None = None) -> list[Attempt]:
    """Convert the first usable candidate of one study (best first); one Attempt per candidate tried.
    A candidate with reusable facts (converted by an earlier run) is taken as it is, if it passes the crop rule."""
    attempts = []
    for scan_id, series, geometry, previous in candidates:
        if previous is not None:
            problem = crop_problem(previous["crop_mm"], spec, max_crop_mm)
            if problem is None:
                attempts.append(Attempt(scan_id, None, "reused", "", previous))
                break
            attempts.append(Attempt(scan_id, "head_cropped", problem, problem, None, series.first.path.parent))
            continue
        try:
            hu = formats.of(series).load_hu(series, geometry, float(spec.pad_hu))
            # every format's stack must look like HU; wrapped negative values are undone (headct.data.formats.hu)
            hu, pixel_fix = plausible(hu, series, geometry, series.first.path.parent)
            content = dedup.content_sha256(hu, geometry)
            volume, affine, crop = to_canonical(hu, geometry, spec)
            del hu  # the source stack is the largest allocation: free it before writing
        except SourceDataError as exc:  # unreadable pixels, values not HU: the format names the reason code
            attempts.append(Attempt(scan_id, exc.reason, exc.why, exc.why, None, exc.path))
            continue
        except NoHeadError as exc:
            attempts.append(Attempt(scan_id, "empty_volume", str(exc), str(exc), None, series.first.path.parent))
            continue
        except Exception as exc:  # unforeseen: this series' reject (guards.unexpected), the next one is tried
            reason, message = guards.unexpected("conversion", exc)
            attempts.append(Attempt(scan_id, reason, message, f"{type(exc).__name__}: {exc}", None,
                                    series.first.path.parent))
            continue
        crop_mm = [round(float(mm), 2) for mm in crop]
        problem = crop_problem(crop_mm, spec, max_crop_mm)
        if problem is not None:  # judged before writing: a rejected volume never reaches the store
            attempts.append(Attempt(scan_id, "head_cropped", problem, problem, None, series.first.path.parent))
            continue
        sha = store.write_volume(dest, scan_id, volume)
        spacing = spec.spacing_mm if spec.fit == "isotropic" else None  # stretch: per axis, see the affine
        facts = {"affine": [float(v) for v in affine.ravel()], "spacing_mm": spacing, "volume_sha256": sha,
                 "content_sha256": content, "crop_mm": crop_mm, "pixel_fix": pixel_fix}
        attempts.append(Attempt(scan_id, None, "ok", "", facts))
        break
    return attempts
