"""A toy input format, to prove the seam: ONE module implementing headct.data.formats.base.InputFormat, plus
`headct.data.formats.register(ToyFormat())`; no other code knows it.

A toy volume is two files side by side:
    <name>.json  {"format": "headct-toy-volume", "study": ..., "series": ..., "patient": ..., "origin_lps": [x, y, z],
                  "spacing_mm": [between slices, between rows, between columns], "kernel": ..., "kvp": ...}
                 recognised by content: the file starts with `{"format": "headct-toy-volume"` (whatever its name)
    <name>.npy   int16 HU, array axes (slice, row, col); an axial stack: columns run toward the patient's Left (+x
                 LPS), rows toward Posterior (+y), slices toward Superior (+z), voxel [0, 0, 0] at origin_lps
The .npy is not claimed (it is counted as an "other" file); its json names the series.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headct.config import QcRules
from headct.data import qc
from headct.data.criteria import Criteria
from headct.data.formats.base import FileRead, InputFormat, Probe, SourceDataError
from headct.data.qc import QcResult
from headct.data.series import Series, SliceHeader, StackGeometry, stack_geometry

MAGIC = b'{"format": "headct-toy-volume"'


def write_toy(json_path: Path, hu: np.ndarray, *, study: str, series: str, patient: str,
              origin_lps: tuple[float, float, float], spacing_mm: tuple[float, float, float], kernel: str = "H30s",
              kvp: float = 120.0) -> None:
    """Write one toy volume: `hu` (slices, rows, cols) int16 beside its json (the json's first key is the magic)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(json_path.with_suffix(".npy"), np.asarray(hu, np.int16), allow_pickle=False)
    meta = {"format": "headct-toy-volume", "study": study, "series": series, "patient": patient,
            "origin_lps": list(origin_lps), "spacing_mm": list(spacing_mm), "kernel": kernel, "kvp": kvp}
    json_path.write_text(json.dumps(meta))


class ToyFormat(InputFormat):
    name = "toy"
    source_format = "toy"
    label = "toy volume"

    def claims(self, probe: Probe) -> bool:
        return probe.head.startswith(MAGIC)

    def read(self, probe: Probe) -> FileRead:
        meta = json.loads(probe.path.read_text())
        pixels = probe.path.with_suffix(".npy")
        if not pixels.is_file():
            return FileRead(problem=f"toy volume without its pixels ({pixels.name} missing)")
        n, rows, cols = np.load(pixels, mmap_mode="r").shape  # header only: the array is not read
        step, row_mm, col_mm = (float(v) for v in meta["spacing_mm"])
        x, y, z = (float(v) for v in meta["origin_lps"])
        return FileRead(headers=tuple(
            SliceHeader(path=probe.path, study_uid=meta["study"], series_uid=meta["series"],
                        patient_id=meta["patient"], modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                        sop_class_uid="", rows=rows, cols=cols, pixel_spacing=(row_mm, col_mm),
                        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), position=(x, y, z + k * step), frames=n,
                        slice_thickness=step, kernel=meta.get("kernel", ""), kvp=meta.get("kvp"), manufacturer="toy",
                        body_part="HEAD", series_description="", contrast_agent="", frame=k, format=self.name)
            for k in range(n)
        ))

    def header_qc(self, series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | StackGeometry:
        problem = qc.acquisition_checks(series, rules, criteria) or qc.stack_checks(series, rules)
        return problem if problem is not None else stack_geometry(series)

    def load_hu(self, series: Series, geometry: StackGeometry, pad_hu: float) -> np.ndarray:
        pixels = series.first.path.with_suffix(".npy")
        try:
            stored = np.load(pixels, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceDataError(pixels, f"toy pixels could not be read ({type(exc).__name__})") from exc
        return stored[[series.slices[i].frame for i in geometry.order]].astype(np.float32)

    def patient_key(self, series: Series, mode: str, src: Path) -> tuple[str | None, str]:
        return series.first.patient_id or None, "dataset"

    def source_bytes(self, series: Series) -> int:
        first = series.first
        return 6 * (first.rows or 0) * (first.cols or 0) * len(series.slices)  # float32 stack + int16 array
