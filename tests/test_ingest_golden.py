"""The store ingest writes, byte for byte, against golden values recorded by the reference code path.

Ingest's speed work (issue 16: one header parse per file, pixels read at the offset discovery found, separable
coordinates for axis-aligned stacks, a cheaper head localisation and content hash, forked workers) must not change
a single output. This test ingests a fixed small source covering every path those changes touch: classic DICOM
(unsigned / signed, slope 1 / 2, pixel padding, BitsStored < BitsAllocated from `headct synth`), axis-aligned and
flipped orientations, gantry tilt, uneven spacing, an oblique stack (the general resampling path), compressed (RLE,
deflate) and multi-frame (Enhanced CT) files and a NIfTI file, with 1 and with 2 worker processes, and compares
the manifest (every column, volume and content SHA-256s included), the rejects and the summary with the golden
JSON, written by the code before those changes (commit 3cc8381):

    PYTHONPATH=$PWD python tests/test_ingest_golden.py write     # only when the store's bytes are MEANT to change
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_factory  # noqa: E402
from dicom_factory import SeriesSpec, nifti_of, slice_positions, write_enhanced, write_series  # noqa: E402
from ingest_helpers import TEST_KEY, make_cfg, run_ingest  # noqa: E402

from headct.config import PreprocessSpec, SynthConfig  # noqa: E402
from headct.data import store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "ingest_store.json"
SPEC = PreprocessSpec(shape=(40, 40, 40), spacing_mm=4.8)  # 192 mm field of view, finer than the tests' default


def _shifted(spec: SeriesSpec, dy_per_mm: float = 0.0, steps: list[float] | None = None) -> dict:
    positions = slice_positions(spec)
    if steps is not None:
        positions[:, 2] = positions[0, 2] + np.concatenate([[0.0], np.cumsum(steps)])
    positions[:, 1] += (positions[:, 2] - positions[0, 2]) * dy_per_mm
    return {"positions": [tuple(p) for p in positions]}


def _variants() -> dict[str, dict]:
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    return {
        "reference": {},
        "reversed_shuffled": {"reverse_instances": True, "shuffle_names": True, "extension": "",
                              "centre": (4.0, -3.0, 2.0)},
        "signed_slope_2": {"unsigned": False, "slope": 2.0, "intercept": -1000.0, "rows": 80, "cols": 70},
        "pixel_padding": {"unsigned": False, "fov_radius_mm": 80.0, "padding_value": -2000},
        "flipped_axes": {"orientation": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), "pixel_spacing": (2.5, 3.5)},
        "gantry_tilt": _shifted(SeriesSpec(), dy_per_mm=float(np.tan(np.radians(12.0)))),
        "uneven_spacing": _shifted(SeriesSpec(), steps=[4.0 if k < 15 else 6.0 for k in range(31)]),
        "oblique_20deg": {"orientation": (1.0, 0.0, 0.0, 0.0, c, -s)},
        "rle": {"transfer_syntax": "rle", "n_slices": 20, "slice_step": 6.0},
        "deflate": {"transfer_syntax": "deflate", "n_slices": 22, "slice_step": 6.0, "unsigned": False},
    }


def build_source(src: Path) -> None:
    """The fixed source: deterministic UIDs (a counter instead of random ones), one study per variant."""
    import pydicom.pixels.utils

    from headct.data.synth.dataset import generate

    counter = itertools.count(1)
    originals = dicom_factory.generate_uid, pydicom.pixels.utils.generate_uid  # compress() makes a new SOP UID
    dicom_factory.generate_uid = pydicom.pixels.utils.generate_uid = (
        lambda *a, **k: f"1.2.826.0.1.3680043.10.1111.{next(counter)}")
    try:
        for i, (name, variant) in enumerate(_variants().items()):
            spec = SeriesSpec(**variant)
            uids = [dicom_factory.generate_uid() for _ in range(len(slice_positions(spec)))]
            write_series(src / f"P{i:02d}" / name, dataclasses.replace(spec, sop_uids=uids),
                         patient_id=f"PID-GOLD-{i:04d}", study_uid=dicom_factory.generate_uid(),
                         series_uid=dicom_factory.generate_uid())
        write_enhanced(src / "P90" / "enhanced.dcm", SeriesSpec(n_slices=24, slope=1.5, intercept=-1200.0,
                                                                 unsigned=False), patient_id="PID-GOLD-0090")
        write_enhanced(src / "P91" / "enhanced_rle.dcm", SeriesSpec(n_slices=16, slice_step=7.0,
                                                                     transfer_syntax="rle"), patient_id="PID-GOLD-0091")
    finally:
        dicom_factory.generate_uid, pydicom.pixels.utils.generate_uid = originals
    (src / "P92").mkdir(parents=True)
    nib.save(nifti_of(SeriesSpec(orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), n_slices=28)), src / "P92" / "head.nii.gz")
    cfg = SynthConfig(out=src / "synth", n_patients=2, seed=11, matrix=64, pixel_mm=3.6, slice_thickness_mm=5.0,
                      extra_series_fraction=1.0, workers=1)
    generate(cfg, cfg.out, progress=False)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN (a missing kVp): JSON has no NaN
        return "NaN"
    return value


def store_facts(tmp: Path, workers: int) -> dict:
    """Ingest the fixed source once; the manifest rows (every column), rejects and summary (without seconds)."""
    cfg = make_cfg(tmp, preprocess=SPEC, workers=workers)
    if not cfg.src.is_dir():
        build_source(cfg.src)
    summary = run_ingest(cfg)
    manifest = store.read_manifest(cfg.dest)
    rows = [{k: _jsonable(v) for k, v in row.items()} for row in manifest.to_dict("records")]
    rejects = (cfg.dest / store.REJECTS).read_text().splitlines()
    volumes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((cfg.dest / store.VOLUMES).glob("*.npy"))}
    return {"manifest": rows, "rejects": rejects, "volume_files": volumes,
            "summary": {k: v for k, v in summary.items() if k != "seconds"}}


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_store_is_byte_identical_to_the_reference_code_path(tmp_path: Path, workers: int) -> None:
    golden = json.loads(GOLDEN.read_text())
    found = json.loads(json.dumps(store_facts(tmp_path, workers)))
    assert found["summary"] == golden["summary"]
    assert found["rejects"] == golden["rejects"]
    assert len(found["manifest"]) == len(golden["manifest"]) >= 12
    for row, expected in zip(found["manifest"], golden["manifest"], strict=True):
        assert row == expected, f"scan {expected['scan_id']} ({expected['series_description']}) differs"
    assert found["volume_files"] == golden["volume_files"]


if __name__ == "__main__" and sys.argv[1:] == ["write"]:
    import tempfile

    os.environ[KEY_ENV] = TEST_KEY
    with tempfile.TemporaryDirectory() as tmp:
        facts = store_facts(Path(tmp), workers=1)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"{GOLDEN}: {len(facts['manifest'])} scans, {len(facts['rejects'])} rejects")
