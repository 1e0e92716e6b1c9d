"""A small RSNA 2019 Intracranial Hemorrhage download, in its real layout (no pytest here).

    stage_2_train/ID_<9 hex>.dcm      one slice per file, every exam in one flat folder, no subfolders
    stage_2_train.csv                 `ID,Label` with rows `ID_<9 hex>_<subtype>` (six subtypes per slice)

The files are written by pydicom like the challenge's: anonymised identifiers that are not valid UIDs
(`ID_<hex>` for SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID and PatientID), no SliceThickness,
InstanceNumber, SeriesDescription or ImageType, 12 bits stored in 16, and the file named after its SOP instance.
Pixels come from the ingest tests' head phantom (tests/dicom_factory.py: air -1000, skull 1000, brain 35, a
2000 HU marker block). `storage` says how HU become stored values:
    "ok"        unsigned, RescaleIntercept -1024 (stored = HU + 1024): the usual storage
    "wrapped"   the download's defect: two's-complement 12-bit values declared unsigned, RescaleIntercept 0
                (stored = HU mod 4096: air reads +3096 HU)
    "no_offset" unsigned 16-bit with RescaleIntercept 0 but stored = HU + 1024: a mis-declared scanner export,
                air reads +24 HU (no correction can make it HU)
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dicom_factory import SeriesSpec, _slice_dataset, head_phantom, slice_positions, voxel_lps

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


@dataclasses.dataclass
class Exam:
    """One exam of the download: its slices' SOP keys (`ID_<hex>`, in position order) and identifiers."""

    study: str
    series: str
    patient: str
    sops: list[str]
    storage: str


def hex_id(rng: random.Random, digits: int) -> str:
    return "ID_" + "".join(rng.choice("0123456789abcdef") for _ in range(digits))


def stored_values(hu: np.ndarray, storage: str) -> tuple[np.ndarray, float]:
    """(uint16 stored values, RescaleIntercept) for HU `hu` stored as `storage` (module docstring)."""
    hu = np.rint(hu).astype(np.int64)
    if storage == "ok":
        return (hu + 1024).astype(np.uint16), -1024.0
    if storage == "wrapped":
        return np.mod(hu, 4096).astype(np.uint16), 0.0
    if storage == "no_offset":
        return (hu + 1024).astype(np.uint16), 0.0
    raise ValueError(storage)


def write_exam(folder: Path, rng: random.Random, storage: str = "ok", n_slices: int = 24,
               phantom: Callable[[np.ndarray], np.ndarray] = head_phantom) -> Exam:
    """Write one exam's slices into the flat `folder` (RSNA naming); returns its keys."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = SeriesSpec(n_slices=n_slices)
    exam = Exam(hex_id(rng, 10), hex_id(rng, 10), hex_id(rng, 8), [hex_id(rng, 9) for _ in range(n_slices)],
                storage)
    for k, position in enumerate(slice_positions(spec)):
        with warnings.catch_warnings():  # `ID_...` is not a valid UI value: pydicom warns, and writes it
            warnings.simplefilter("ignore", UserWarning)
            _write_slice(folder, spec, position, k, exam, phantom)
    return exam


def _write_slice(folder: Path, spec: SeriesSpec, position: np.ndarray, k: int, exam: Exam,
                 phantom: Callable[[np.ndarray], np.ndarray]) -> None:
    storage = exam.storage
    ds = _slice_dataset(spec, position, k + 1, exam.study, exam.series, exam.patient, exam.patient)
    for keyword in ("SliceThickness", "InstanceNumber", "SeriesDescription", "ImageType", "StudyDescription",
                    "PatientName", "AccessionNumber", "InstitutionName"):
        delattr(ds, keyword)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = exam.sops[k]
    stored, intercept = stored_values(phantom(voxel_lps(spec, position)), storage)
    ds.BitsStored, ds.HighBit = (12, 11) if storage != "no_offset" else (16, 15)
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
    ds.WindowCenter, ds.WindowWidth = 30, 80
    ds.PixelData = stored.tobytes()
    ds.save_as(folder / f"{exam.sops[k]}.dcm", enforce_file_format=True)


def label_rows(sops: list[str], positive: dict[int, set[str]] | None = None) -> list[tuple[str, str]]:
    """The six rows per slice of stage_2_train.csv; `positive`: slice index -> subtypes labelled 1."""
    positive = positive or {}
    return [(f"{sop}_{subtype}", "1" if subtype in positive.get(k, set()) else "0")
            for k, sop in enumerate(sops) for subtype in SUBTYPES]


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("ID,Label\n" + "".join(f"{key},{value}\n" for key, value in rows))
    return path


def skull_of(value: float) -> Callable[[np.ndarray], np.ndarray]:
    """The head phantom with its skull at `value` HU (e.g. 2500: metal-dense bone, ambiguous once wrapped)."""
    def phantom(lps: np.ndarray) -> np.ndarray:
        hu = head_phantom(lps)
        hu[hu == 1000.0] = value
        return hu
    return phantom
