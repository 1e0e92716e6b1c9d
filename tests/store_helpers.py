"""A canonical store as ingest leaves it, for tests that need volumes but not the DICOM path to them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from headct.config import PreprocessSpec
from headct.data import store as store_io


def write_store(store: Path, volumes: Mapping[str, np.ndarray], patients: Mapping[str, str] | None = None,
                spec: PreprocessSpec | None = None) -> list[Path]:
    """volumes/<scan_id>.npy (written as given, any dtype or shape), preprocess.json (`spec`, by default the first
    volume's grid at 6 mm) and manifest.parquet with the contract's columns and each file's SHA-256.
    Returns the volume paths in the order of `volumes`."""
    first = next(iter(volumes.values()))
    spec = spec or PreprocessSpec(shape=tuple(first.shape), spacing_mm=6.0)
    store_io.write_preprocess(store, spec)
    affine = json.dumps(np.diag([spec.spacing_mm] * 3 + [1.0]).ravel().tolist())
    rows = []
    for scan_id, volume in volumes.items():
        sha = store_io.write_volume(store, scan_id, volume)
        rows.append({
            "scan_id": scan_id, "study_id": f"stu_{scan_id[4:]}",
            "patient_id": (patients or {}).get(scan_id, f"pat_{scan_id[4:]}"), "patient_key_source": "test",
            "volume": store_io.volume_relpath(scan_id), "affine": affine, "spacing_mm": spec.spacing_mm,
            "src_shape": json.dumps(list(volume.shape)), "src_spacing_mm": json.dumps([spec.spacing_mm] * 3),
            "slice_thickness_mm": spec.spacing_mm, "tilt_deg": 0.0, "kvp": 120.0, "kernel": "H30s",
            "manufacturer": "TEST", "body_part": "HEAD", "series_description": "test", "n_slices": volume.shape[-1],
            "preprocess_version": spec.version, "volume_sha256": sha, "source_format": "test",
            "content_sha256": sha, "instances_id": "", **dict.fromkeys(store_io.CROP_COLUMNS, 0.0),
        })
    store_io.write_manifest(store, rows)
    return [store / store_io.volume_relpath(scan_id) for scan_id in volumes]
