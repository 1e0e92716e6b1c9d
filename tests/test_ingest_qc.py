"""QC rules (ingest.qc) and the seed's criteria CSV: each rule's reason code, from headers alone and end to end."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from ingest_helpers import RULES, TEST_KEY, make_cfg, run_ingest  # noqa: E402

from headct.config import IngestConfig, QcRules  # noqa: E402
from headct.data import store  # noqa: E402
from headct.data.criteria import read_criteria  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402
from headct.data.selection import qc_series  # noqa: E402
from headct.data.series import Series, SliceHeader  # noqa: E402
from headct.errors import InputError  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def series(n: int = 24, step: float = 5.0, **change) -> Series:
    """Headers only: an axial stack of `n` slices `step` mm apart; `change` edits per-slice fields."""
    headers = []
    for k in range(n):
        fields = dict(
            path=Path(f"/x/{k}"), study_uid="1.2", series_uid="1.2.3", patient_id="p", modality="CT",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sop_class_uid=CT, rows=8, cols=8,
            pixel_spacing=(1.0, 1.0), orientation=(1.0, 0, 0, 0, 1.0, 0), position=(0.0, 0.0, step * k), frames=1,
            slice_thickness=step, kernel="Hr40s\\3", kvp=120.0, manufacturer="", body_part="",
            series_description="HEAD", contrast_agent="", study_description="CT HEAD WITHOUT IV CONTRAST",
        )
        for key, value in change.items():
            fields[key] = value(k) if callable(value) else value
        headers.append(SliceHeader(**fields))
    return Series("1.2", "1.2.3", tuple(headers))


def tilted(degrees: float):
    import math

    return lambda k: (0.0, 5.0 * k * math.tan(math.radians(degrees)), 5.0 * k)


@pytest.mark.parametrize(
    ("change", "rules", "reason"),
    [
        ({}, {}, None),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.67", "modality": "SR"}, {}, "dose_report"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7", "series_description": "Dose Report"}, {}, "dose_report"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, {}, "secondary_capture"),
        ({"series_description": "LOW DOSE HEAD"}, {}, None),  # a real CT series named "dose" is not a report
        ({"modality": "MR"}, {}, "not_ct"),
        ({"series_description": "CTA HEAD"}, {}, "description"),
        ({"study_description": "CT PERFUSION BRAIN"}, {}, "description"),
        ({"contrast_agent": "IOHEXOL"}, {}, "contrast"),
        ({"contrast_agent": "IOHEXOL"}, {"contrast": "allow"}, None),
        ({"kernel": "H70h"}, {"kernel_deny": ["H[6-9]\\d"]}, "kernel"),
        ({"kernel": "FC30"}, {"kernel_allow": ["^Hr", "^J3"]}, "kernel"),
        ({"kvp": 40.0}, {}, "kvp"),
        ({"kvp": None}, {}, None),  # no KVP: the rule cannot apply
        ({"position": lambda k: (0.0, 0.0, 5.0 * k)}, {"min_coverage_mm": 150.0}, "too_short"),
        ({"position": tilted(20.0)}, {}, None),  # corrected by default
        ({"position": tilted(20.0)}, {"gantry_tilt": "reject"}, "gantry_tilt"),
        ({"position": tilted(40.0)}, {}, "gantry_tilt"),  # beyond max_tilt_deg
        ({"position": lambda k: (0.0, 0.0, 5.0 * k + (8.0 if k > 10 else 0.0))}, {"max_gap_factor": 1.5},
         "missing_slices"),
        ({"orientation": (1.0, 0.0, 0.0, 0.0, 0.94, -0.342)}, {}, None),  # 20 degrees oblique: resampled
        ({"orientation": (1.0, 0.0, 0.0, 0.0, 0.94, -0.342)}, {"max_oblique_deg": 15.0}, "non_axial"),
    ],
)
def test_rules_give_their_reason_codes(change: dict, rules: dict, reason: str | None) -> None:
    result = qc_series(series(**change), QcRules(**{"min_slices": 8, "min_coverage_mm": 60.0, **rules}))
    assert result.reason == reason, result.message


def write_criteria(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    pd.DataFrame(rows, columns=["Study Description", "KVP", "Convolution Kernel"]).to_csv(path, index=False)
    return path


def test_criteria_csv_in_the_seeds_layout_is_an_allow_list(tmp_path: Path) -> None:
    path = write_criteria(tmp_path / "criteria.csv", [
        ("CT HEAD WITHOUT IV CONTRAST", "120.0", "['Hr40s', '3']"),  # the seed's list form of a 2-valued kernel
        ("CT BRAIN WO IVC", "120.0", "H40s"),
        ("ANY KERNEL HEAD", "", ""),  # empty cells match anything
    ])
    criteria = read_criteria(path)
    assert criteria.matches("ct head without iv contrast ", 120, "Hr40s\\3")  # DICOM's backslash form
    assert not criteria.matches("CT HEAD WITHOUT IV CONTRAST", 100, "Hr40s\\3")
    assert not criteria.matches("CT HEAD WITHOUT IV CONTRAST", 120, "Hr40s")
    assert criteria.matches("CT BRAIN WO IVC", 120.0, "H40s") and criteria.matches("Any Kernel Head", 80, "B70f")
    rules = QcRules(min_slices=8, min_coverage_mm=0.0)
    assert qc_series(series(), rules, criteria).reason is None
    rejected = qc_series(series(kvp=100.0), rules, criteria)
    assert rejected.reason == "criteria" and "100" in rejected.message
    write_criteria(path, [])
    with pytest.raises(InputError, match="no rows"):
        read_criteria(path)
    pd.DataFrame({"Study Description": ["x"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="missing column"):
        read_criteria(path)


def test_criteria_csv_applies_end_to_end_and_a_bad_one_fails_before_work(tmp_path: Path) -> None:
    criteria = write_criteria(tmp_path / "criteria.csv", [("CT HEAD WITHOUT CONTRAST", "120", "H30s")])
    cfg = make_cfg(tmp_path, qc=RULES.model_copy(update={"criteria_csv": criteria}))
    write_series(cfg.src / "a", SeriesSpec(), patient_id="PID-CRIT-0001")
    write_series(cfg.src / "b", SeriesSpec(kvp=100.0, centre=(0.0, 0.0, 2.5)), patient_id="PID-CRIT-0002")
    assert run_ingest(cfg)["rejected"] == {"criteria": 1}
    bad = cfg.model_copy(update={"qc": RULES.model_copy(update={"criteria_csv": tmp_path / "missing.csv"})})
    with pytest.raises(InputError, match="missing.csv"):
        run_ingest(bad)


def test_rules_are_a_config_section_with_named_errors() -> None:
    from headct.config import ConfigError, load_params

    params, _ = load_params(overrides=["ingest.qc.min_coverage_mm=100", "ingest.qc.kernel_deny=['B7']"],
                            root=Path("/nonexistent-root"))
    assert params.ingest.qc.min_coverage_mm == 100 and params.ingest.qc.kernel_deny == ["B7"]
    with pytest.raises(ConfigError, match="kernel_deny"):
        load_params(overrides=["ingest.qc.kernel_deny=['(']"], root=Path("/nonexistent-root"))
    with pytest.raises(ConfigError, match="shard"):
        load_params(overrides=["ingest.shard=3/2"], root=Path("/nonexistent-root"))


def test_reasons_found_on_pixels_and_identity(tmp_path: Path) -> None:
    """empty_volume (nothing above the head threshold), no_patient_key (no PatientID), contrast end to end."""
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "air", SeriesSpec(), lambda lps: lps[..., 0] * 0 - 1000.0, patient_id="PID-AIR-00001")
    write_series(cfg.src / "anon", SeriesSpec(centre=(0.0, 0.0, 2.5)), patient_id="")
    write_series(cfg.src / "con", SeriesSpec(contrast_agent="IOPAMIDOL", centre=(0.0, 0.0, 5.0)),
                 patient_id="PID-CON-00001")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 0
    assert summary["rejected"] == {"contrast": 1, "empty_volume": 1, "no_patient_key": 1}


def test_keep_all_accepts_every_passing_series_of_a_study(tmp_path: Path) -> None:
    cfg: IngestConfig = make_cfg(tmp_path, keep="all")
    study = generate_uid()
    uids = [generate_uid() for _ in range(3)]
    write_series(cfg.src / "soft", SeriesSpec(), study_uid=study, series_uid=uids[0])
    write_series(cfg.src / "bone", SeriesSpec(kernel="H70h", centre=(0.0, 0.0, 2.5)), study_uid=study,
                 series_uid=uids[1])
    write_series(cfg.src / "loc", SeriesSpec(n_slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
                 study_uid=study, series_uid=uids[2])
    summary = run_ingest(cfg)
    pseudo = Pseudonymizer(TEST_KEY.encode())
    manifest = store.read_manifest(cfg.dest)
    assert set(manifest["scan_id"]) == {pseudo.series(uids[0]), pseudo.series(uids[1])}
    assert summary["rejected"] == {"localizer": 1} and summary["studies_seen"] == 1


def long_head(lps):
    """The test head stretched front to back: 85 / 0.65 = 130.8 mm semi-axis, a 262 mm long head (the canonical
    grid of these tests covers 192 mm), no table."""
    from dicom_factory import head_phantom

    return head_phantom(lps * np.array([1.0, 0.65, 1.0]), table=False, marker=False)


LONG = SeriesSpec(rows=100)  # 300 mm along LPS y (rows run posterior), so the whole long head is scanned


def test_the_cropped_extent_of_the_head_is_recorded_per_axis(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, qc=RULES.model_copy(update={"max_crop_mm": None}))  # record, never reject
    write_series(cfg.src / "normal", SeriesSpec(), patient_id="PID-CROP-0001")
    write_series(cfg.src / "long", LONG, long_head, patient_id="PID-CROP-0002")
    summary = run_ingest(cfg)
    assert summary["accepted"] == 2
    manifest = store.read_manifest(cfg.dest)
    crops = {row["src_shape"]: [row[c] for c in store.CROP_COLUMNS] for _, row in manifest.iterrows()}
    normal, long = crops['[64, 72, 32]'], crops['[64, 100, 32]']
    assert normal == [0.0, 0.0, 0.0]  # a 170 mm head (and its table, cut off by the head localisation) fits
    # The head is 262 mm long; the localisation's box spans 255 mm (pixel centres 3 mm apart, its in-plane opening
    # trims the one-pixel-wide tip row at each end): 255 - 192 = 63 mm cut along y (anterior-posterior); x, z fit.
    assert long == [0.0, 63.0, 0.0], long
    assert manifest[list(store.CROP_COLUMNS)].dtypes.tolist() == [np.dtype("float64")] * 3


def test_a_head_cropped_beyond_max_crop_mm_is_rejected_with_its_reason(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, qc=RULES.model_copy(update={"max_crop_mm": None}))
    write_series(cfg.src / "long", LONG, long_head, patient_id="PID-CROP-0003")
    assert run_ingest(cfg)["accepted"] == 1  # recorded only
    strict = cfg.model_copy(update={"qc": RULES.model_copy(update={"max_crop_mm": 40.0})})
    summary = run_ingest(strict)  # the stored volume is judged again under the new rule, not reused blindly
    assert summary["accepted"] == 0 and summary["rejected"] == {"head_cropped": 1}
    (row,) = pd.read_csv(cfg.dest / store.REJECTS).to_dict("records")
    assert row["reason"] == "head_cropped"
    assert re.fullmatch(r"the head extends beyond the canonical grid by 6\d\.\d mm along y \(max_crop_mm 40; field "
                        r"of view \[192\.0, 192\.0, 192\.0\] mm\)", row["message"]), row["message"]
    assert not list((cfg.dest / store.VOLUMES).glob("*.npy"))  # no volume of a rejected series stays
    fresh = make_cfg(tmp_path / "fresh", qc=RULES.model_copy(update={"max_crop_mm": 40.0}))
    write_series(fresh.src / "long", LONG, long_head, patient_id="PID-CROP-0003")
    assert run_ingest(fresh)["rejected"] == {"head_cropped": 1}  # converted, judged, never written
    assert not list((fresh.dest / store.VOLUMES).glob("*.npy"))


def test_cropped_mm_measures_the_head_box_outside_the_grid_edges() -> None:
    from headct.config import PreprocessSpec
    from headct.data.resample import canonical_affine, cropped_mm

    spec = PreprocessSpec(shape=(32, 32, 32), spacing_mm=6.0)  # 192 mm from voxel edge to voxel edge
    lo, hi = np.array([-50.0, -110.0, -96.0]), np.array([50.0, 110.0, 96.0])
    affine = canonical_affine(spec, lo, hi)
    np.testing.assert_allclose(cropped_mm(lo, hi, affine, spec.shape), [0.0, 28.0, 0.0])
    shifted = affine.copy()
    shifted[2, 3] += 10.0  # a grid not centred on the box (head_localisation "none"): what sticks out below
    np.testing.assert_allclose(cropped_mm(lo, hi, shifted, spec.shape), [0.0, 28.0, 10.0])
