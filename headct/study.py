"""One study (a DICOM folder, or a NIfTI file) -> canonical volumes on a model's grid, through the ingest code.

Inference must see a study exactly as training saw the store, so this runs the same `headct.data.ingest` (QC,
series choice, HU, geometry, resampling) into a throw-away store in a temporary folder, with a random
pseudonym key that is discarded (the ids printed are one-off and link to nothing), and no linkage file kept.
Used by `Encoder.embed(path)` and `headct predict`.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headct.errors import InputError


@dataclass
class StudyVolumes:
    """The accepted series of one study as canonical int16 HU volumes (X, Y, Z), with what QC said."""

    volumes: list[np.ndarray]
    series: list[dict[str, Any]]  # one manifest row per volume (one-off scan ids, kernel, slices, spacing...)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # reject rows: one-off series_id, reason, message
    summary: dict[str, Any] = field(default_factory=dict)


def load_study(path: str | Path, preprocess: dict[str, Any], keep: str = "best", workers: int = 1) -> StudyVolumes:
    """A DICOM folder (any layout, any file names) or one file of a registered input format (a `.nii`/`.nii.gz`
    file, an Enhanced CT object; headct.data.formats) -> StudyVolumes.

    preprocess: the model's preprocessing spec (its config.json `preprocess`), so the grid matches the model.
    InputError (naming the path) when nothing in it passes QC, with the reject reasons.
    """
    from rich.console import Console

    from headct.config.base import PreprocessSpec
    from headct.config.data import IngestConfig
    from headct.data.discovery import recognise
    from headct.data.ingest import ingest
    from headct.data.store import read_manifest
    from headct.data.volumes import load_volume

    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    spec = PreprocessSpec.model_validate({k: v for k, v in preprocess.items() if k != "version"})
    with tempfile.TemporaryDirectory(prefix="headct-study-") as tmp:
        work = Path(tmp)
        src = source
        if source.is_file():
            if recognise(source) is None:  # a file some input format reads (a NIfTI, an Enhanced CT object ...)
                raise InputError(f"{source}: expected a DICOM folder or a .nii/.nii.gz file (or another file an "
                                 "input format reads)")
            src = work / "src"
            src.mkdir()
            shutil.copy2(source, src / source.name)
        cfg = IngestConfig(src=src, dest=work / "store", labels=None, labels_format="none", patient_key="dicom",
                           preprocess=spec, linkage=work / "linkage.csv", keep=keep, workers=workers,
                           contact_sheet_volumes=0, report_dir=work / "reports")
        result = ingest(cfg, work, Console(stderr=True, quiet=True), key=secrets.token_bytes(32))
        rejects_file = cfg.dest / "rejects.csv"
        rejected = []
        if rejects_file.is_file():
            import pandas as pd

            rejected = pd.read_csv(rejects_file, keep_default_na=False).to_dict("records")
        if not result.manifest_rows:
            reasons = "; ".join(f"{r['reason']}: {r['message']}" for r in rejected) or "no series found"
            raise InputError(f"{source}: no series passed quality control ({reasons})")
        manifest = read_manifest(cfg.dest)
        rows = manifest.to_dict("records")
        volumes = [load_volume(cfg.dest / row["volume"], row["scan_id"]) for row in rows]
    return StudyVolumes(volumes, rows, rejected, dict(result.summary))
