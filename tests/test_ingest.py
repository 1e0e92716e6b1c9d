"""Ingestion: real DICOM files written with pydicom (tests/dicom_factory.py) -> the canonical store.

Geometry is checked in world terms: a marker planted on the patient's Left, Anterior, Superior side must land
where RAS+ puts it (x index toward the patient's Right, so a left-sided marker has a LOW x index).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import AIR_HU, MARKER_HU, SeriesSpec, nifti_of, slice_positions, write_series  # noqa: E402
from ingest_helpers import (  # noqa: E402
    EXPECTED_MARKER_RAS,
    SPEC,
    TEST_KEY,
    make_cfg,
    marker_ras,
    only_volume,
    run_ingest,
)

from headct.config import JobContext, QcRules  # noqa: E402
from headct.data import store  # noqa: E402
from headct.data.identity import (  # noqa: E402
    DEMO_KEY,
    KEY_ENV,
    KEY_FILE_ENV,
    Pseudonymizer,
    configured_key,
)
from headct.data.label_sources.cq500 import read_cq500  # noqa: E402
from headct.data.selection import is_bone_kernel, qc_series, rank_series  # noqa: E402
from headct.data.series import Series, SliceHeader, stack_geometry  # noqa: E402
from headct.data.synth import marker  # noqa: E402
from headct.errors import InputError  # noqa: E402


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


# -------------------------------------------------------------------------------------------------- geometry
def test_marker_lands_left_anterior_superior_in_ras(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "a", SeriesSpec())
    run_ingest(cfg)
    vol, affine, row = only_volume(cfg)
    assert vol.dtype == np.int16 and vol.shape == SPEC.shape
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    index = np.array(np.unravel_index(np.argmax(vol), vol.shape))
    assert vol[tuple(index)] == MARKER_HU
    assert np.abs(marker_ras(vol, affine) - EXPECTED_MARKER_RAS).max() <= 2.0
    centre = (np.array(SPEC.shape) - 1) / 2
    assert index[0] < centre[0] and index[1] > centre[1] and index[2] > centre[2]
    # the grid is centred on the head (at the origin), not pulled toward the table behind it
    assert np.abs(affine[:3, :3] @ centre + affine[:3, 3]).max() < 3.0
    assert json.loads(row["src_shape"]) == [64, 72, 32] and row["n_slices"] == 32


@pytest.mark.parametrize(
    ("variant", "exact"),
    [
        ({"reverse_instances": True, "shuffle_names": True, "extension": ""}, True),
        ({"orientation": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)}, False),  # image rotated 180 degrees
        ({"orientation": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), "reverse_instances": True}, False),  # normal points down
    ],
)
def test_file_order_and_orientation_do_not_change_the_volume(tmp_path: Path, variant: dict, exact: bool) -> None:
    reference, other = make_cfg(tmp_path / "ref"), make_cfg(tmp_path / "var")
    write_series(reference.src / "s", SeriesSpec())
    write_series(other.src / "s", SeriesSpec(**variant))
    run_ingest(reference)
    run_ingest(other)
    a, affine_a, _ = only_volume(reference)
    b, affine_b, _ = only_volume(other)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-6)
    if exact:
        assert np.array_equal(a, b)
    else:
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("slope", "intercept", "unsigned"), [(1.0, -1024.0, True), (1.0, 0.0, False), (2.0, -2048.0, True)]
)
def test_rescale_gives_hu_and_outside_the_scan_is_padded_with_minus_1024(
    tmp_path: Path, slope: float, intercept: float, unsigned: bool
) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SeriesSpec(slope=slope, intercept=intercept, unsigned=unsigned))
    run_ingest(cfg)
    vol, affine, _ = only_volume(cfg)
    inverse = np.linalg.inv(affine)

    def at(ras: tuple[float, float, float]) -> int:
        i, j, k = np.rint(inverse[:3, :3] @ np.array(ras) + inverse[:3, 3]).astype(int)
        return int(vol[i, j, k])

    assert abs(at((0.0, 0.0, 0.0)) - 35) <= 1  # brain
    assert at((-90.0, 95.0, 0.0)) == AIR_HU  # air inside the scanned field
    # the stack covers 155 mm of z; the 192 mm grid reaches beyond it: padding, never 0
    assert (vol[:, :, 0] == -1024).all() and (vol[:, :, -1] == -1024).all()


@pytest.mark.parametrize("distortion", ["uneven_spacing", "gantry_tilt"])
def test_uneven_spacing_and_gantry_tilt_keep_anatomy_in_place(tmp_path: Path, distortion: str) -> None:
    regular = slice_positions(SeriesSpec())
    positions = regular.copy()
    if distortion == "uneven_spacing":  # 4 mm steps in the lower half, 6 mm in the upper half
        steps = np.where(np.arange(len(regular) - 1) < len(regular) // 2, 4.0, 6.0)
        positions[:, 2] = regular[0, 2] + np.concatenate([[0.0], np.cumsum(steps)])
    else:  # 15 degree tilt: each slice shifted along y in proportion to its height
        positions[:, 1] += (regular[:, 2] - regular[0, 2]) * np.tan(np.radians(15)) - 20.0
    reference, other = make_cfg(tmp_path / "ref"), make_cfg(tmp_path / "var")
    write_series(reference.src / "s", SeriesSpec())
    write_series(other.src / "s", SeriesSpec(positions=[tuple(p) for p in positions]))
    run_ingest(reference)
    run_ingest(other)
    a, affine_a, _ = only_volume(reference)
    b, affine_b, row = only_volume(other)
    if distortion == "gantry_tilt":
        assert abs(row["tilt_deg"] - 15) < 0.1
    for vol, affine in ((a, affine_a), (b, affine_b)):  # 4 mm: 6 mm-spaced source slices sample the 12 mm block
        assert np.abs(marker_ras(vol, affine) - EXPECTED_MARKER_RAS).max() <= 4.0
    inside = (a > -1024) & (b > -1024)  # the tilted stack covers a slightly different field
    np.testing.assert_allclose(affine_a, affine_b, atol=2.0)  # head box found on other slices: < 1/3 voxel
    assert (np.abs(a.astype(int) - b.astype(int))[inside] > 200).mean() < 0.06


def test_stretch_fit_fills_the_grid_with_the_head(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, preprocess=SPEC.model_copy(update={"fit": "stretch"}))
    write_series(cfg.src / "s", SeriesSpec())
    run_ingest(cfg)
    vol, affine, row = only_volume(cfg)
    spacing = np.diag(affine)[:3]
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and np.ptp(spacing) > 0.5  # anisotropic by design
    assert pd.isna(row["spacing_mm"])
    assert (vol > -500).mean() > 0.45  # an ellipsoid fills ~52% of its box


# ------------------------------------------------------------------------------------------------- selection
def test_bone_kernel_localizer_and_others_are_not_selected_with_reasons(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    study = generate_uid()
    uids = {name: generate_uid() for name in ("plain", "bone", "loc", "mr", "short")}
    specs = {
        "plain": SeriesSpec(),
        "bone": SeriesSpec(kernel="H70h", series_description="CT BONE"),
        "loc": SeriesSpec(n_slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        "mr": SeriesSpec(modality="MR"),
        "short": SeriesSpec(n_slices=4),
    }
    for name, spec in specs.items():
        write_series(cfg.src / "P" / name, spec, study_uid=study, series_uid=uids[name])
    summary = run_ingest(cfg)
    pseudo = Pseudonymizer(TEST_KEY.encode())
    _, _, row = only_volume(cfg)
    assert row["scan_id"] == pseudo.series(uids["plain"]) and row["kernel"] == "H30s"
    rejects = pd.read_csv(cfg.dest / store.REJECTS).set_index("series_id")
    reasons = {name: rejects.loc[pseudo.series(uid), "reason"] for name, uid in uids.items() if name != "plain"}
    assert reasons == {"bone": "not_selected", "loc": "localizer", "mr": "not_ct", "short": "too_few_slices"}
    assert "bone" in rejects.loc[pseudo.series(uids["bone"]), "message"]
    assert summary["rejected"] == {"localizer": 1, "not_ct": 1, "not_selected": 1, "too_few_slices": 1}
    assert (rejects["study_id"] == pseudo.study(study)).all()


def _series(n: int = 12, **change) -> Series:
    """Headers only (no files): an axial stack of `n` slices 5 mm apart; `change` edits per-slice fields."""
    headers = []
    for k in range(n):
        fields = dict(
            path=Path(f"/x/{k}"), study_uid="1.2", series_uid="1.2.3", patient_id="p", modality="CT",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sop_class_uid="1.2.840.10008.5.1.4.1.1.2", rows=8, cols=8,
            pixel_spacing=(1.0, 1.0), orientation=(1.0, 0, 0, 0, 1.0, 0), position=(0.0, 0.0, 5.0 * k), frames=1,
            slice_thickness=5.0, kernel="H30s", kvp=120.0, manufacturer="", body_part="", series_description="",
            contrast_agent="",
        )
        for key, value in change.items():
            fields[key] = value(k) if callable(value) else value
        headers.append(SliceHeader(**fields))
    return Series("1.2", "1.2.3", tuple(headers))


@pytest.mark.parametrize(
    ("series", "reason"),
    [
        (_series(), None),
        (_series(position=lambda k: (0.0, 0.0, 5.0 * (k // 2))), "duplicate_positions"),
        (_series(orientation=lambda k: (1.0, 0, 0, 0, 1.0, 0) if k else (1.0, 0, 0, 0, 0.9, 0.43)),
         "inconsistent_geometry"),
        (_series(pixel_spacing=lambda k: (1.0, 1.0) if k else (0.8, 0.8)), "inconsistent_geometry"),
        (_series(rows=lambda k: 8 if k else 16), "inconsistent_geometry"),
        (_series(orientation=(0.0, 1.0, 0, 0, 0, -1.0), position=lambda k: (5.0 * k, 0.0, 0.0)), "non_axial"),
        (_series(position=lambda k: (0.0, 0.0, 5.0 * k + (20.0 if k > 5 else 0.0))), "missing_slices"),
        (_series(frames=40, frame_problem="multi-frame object (40 frames) without per-frame functional groups"),
         "unsupported"),
        (_series(position=None), "missing_geometry"),
        (_series(modality="SR"), "not_ct"),
        (_series(n=1), "localizer"),
    ],
)
def test_series_qc_reason_codes(series: Series, reason: str | None) -> None:
    assert qc_series(series, QcRules(min_slices=8, min_coverage_mm=0.0)).reason == reason


def test_gantry_tilt_is_measured_and_uneven_spacing_is_kept() -> None:
    tilted = _series(position=lambda k: (0.0, 5.0 * k * np.tan(np.radians(15)), 5.0 * k))
    geometry = qc_series(tilted, QcRules(min_slices=8, min_coverage_mm=0.0)).geometry
    assert geometry is not None and abs(geometry.tilt_deg - 15) < 0.01
    uneven = _series(position=lambda k: (0.0, 0.0, 5.0 * k + (2.0 if k > 5 else 0.0)))
    assert qc_series(uneven, QcRules(min_slices=8, min_coverage_mm=0.0)).reason is None


@pytest.mark.parametrize(
    ("kernel", "description", "bone"),
    [("H30s", "", False), ("H70h", "", True), ("Hr64", "", True), ("B30f", "", False), ("BONE", "", True),
     ("STANDARD", "", False), ("SOFT", "CT BONE", True), ("", "CT PLAIN THIN", False), ("LUNG", "", True)],
)
def test_bone_kernel_names(kernel: str, description: str, bone: bool) -> None:
    assert is_bone_kernel(kernel, description) is bone


def test_ranking_prefers_thickness_in_range_then_coverage_then_slices() -> None:
    def candidate(uid: str, n: int, step: float, thickness: float):
        s = _series(n=n, position=lambda k: (0.0, 0.0, step * k), slice_thickness=thickness)
        s = Series("1.2", uid, s.slices)
        return s, stack_geometry(s)

    thick = candidate("9", 20, 5.0, 5.0)  # 95 mm
    too_thin = candidate("8", 400, 0.25, 0.25)  # 99.75 mm but 0.25 mm thick: out of range
    shorter = candidate("7", 10, 5.0, 5.0)  # 45 mm
    thin = candidate("6", 96, 1.0, 1.0)  # 95 mm, more slices than `thick`
    ranked = rank_series([thick, too_thin, shorter, thin])
    assert [s.series_uid for s, _ in ranked] == ["6", "9", "7", "8"]
    twin = candidate("5", 20, 5.0, 5.0)
    assert [s.series_uid for s, _ in rank_series([thick, twin])] == ["5", "9"]  # deterministic tie-break


# -------------------------------------------------------------------------------------------------- identity
def test_pseudonyms_are_keyed_stable_and_typed() -> None:
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert a.series("1.2.3") == Pseudonymizer(b"k" * 32).series("1.2.3")
    assert a.series("1.2.3") != b.series("1.2.3")
    assert a.patient("1.2.3")[4:] != a.study("1.2.3")[4:]
    for prefix, value in (("pat", a.patient("X")), ("stu", a.study("1.2")), ("ser", a.series("1.2"))):
        assert re.fullmatch(rf"{prefix}_[0-9a-f]{{16}}", value), value
    assert "k" * 32 not in repr(a)


def test_key_comes_from_env_or_file_and_is_never_echoed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    assert configured_key() is None
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(InputError, match="shorter") as err:
        configured_key()
    assert "short" not in str(err.value).replace("shorter", "")  # the key itself is never echoed
    monkeypatch.setenv(KEY_ENV, "s" * 40)
    assert configured_key() == b"s" * 40
    monkeypatch.delenv(KEY_ENV)
    (tmp_path / "key").write_text("f" * 40 + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "key"))
    assert configured_key() == b"f" * 40


def mark_synthetic(paths: list[Path]) -> None:
    """Write `headct synth`'s marker into DICOM files (what the generator does to every file it writes)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.private_block(marker.GROUP, marker.CREATOR, create=True).add_new(marker.ELEMENT, "LO", marker.VALUE)
        ds.save_as(path, enforce_file_format=True)


def test_real_data_without_a_key_is_refused_at_its_first_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "s", SeriesSpec(n_slices=8))
    with pytest.raises(InputError, match=KEY_ENV) as err:
        run_ingest(cfg)
    assert re.search(r"first file read under SRC \(s/CT0000\d\d.dcm\) is not synthetic", str(err.value))
    assert not cfg.dest.exists()
    # the public demo key given as the key is no key for real data either
    monkeypatch.setenv(KEY_ENV, DEMO_KEY.decode())
    with pytest.raises(InputError, match="public demo key"):
        run_ingest(cfg)
    assert not cfg.dest.exists()


def test_synthetic_data_uses_the_demo_key_and_one_real_file_among_it_stops_the_run(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    cfg = make_cfg(tmp_path)
    series_uid = "1.2.826.0.1.3680043.8.498.777"
    mark_synthetic(write_series(cfg.src / "a", SeriesSpec(n_slices=8), series_uid=series_uid))
    assert run_ingest(cfg)["accepted"] == 1
    assert store.read_manifest(cfg.dest)["scan_id"].tolist() == [Pseudonymizer(DEMO_KEY).series(series_uid)]
    # an export beside it, found only by the full walk (the first file read is synthetic)
    write_series(cfg.src / "b", SeriesSpec(n_slices=9))  # other pixels: not a duplicate of a/
    before = (cfg.dest / "manifest.parquet").read_bytes()
    with pytest.raises(InputError, match=r"9 file\(s\) under SRC \(e.g. b/CT0000"):
        run_ingest(cfg)
    assert (cfg.dest / "manifest.parquet").read_bytes() == before  # nothing written
    monkeypatch.setenv(KEY_ENV, TEST_KEY)  # with a real key both are ingested, under that key (a new store:
    assert run_ingest(cfg.model_copy(update={"dest": tmp_path / "keyed"}))["accepted"] == 2  # new pseudonyms)


def test_a_nifti_is_synthetic_only_with_the_marker_in_its_descrip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    cfg = make_cfg(tmp_path)
    image = nifti_of(SeriesSpec())
    cfg.src.mkdir(parents=True)
    nib.save(image, cfg.src / "head.nii.gz")
    with pytest.raises(InputError, match="not synthetic"):
        run_ingest(cfg)
    image.header["descrip"] = marker.VALUE.encode()
    nib.save(image, cfg.src / "head.nii.gz")
    assert run_ingest(cfg)["accepted"] == 1


def test_the_removed_demo_key_setting_is_refused_naming_the_new_rule(tmp_path: Path) -> None:
    from headct.config import ConfigError, load_params

    (tmp_path / "params.yaml").write_text("ingest:\n  demo_key: true\n")
    with pytest.raises(ConfigError, match=r"ingest.demo_key = True: .*removed.*headct synth.*HEADCT_PSEUDONYM_KEY"):
        load_params(root=tmp_path)


def test_missing_or_empty_source_is_an_input_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        run_ingest(cfg)
    cfg.src.mkdir()
    with pytest.raises(InputError, match="empty"):
        run_ingest(cfg)
    (cfg.src / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no readable DICOM"):
        run_ingest(cfg)


# ---------------------------------------------------------------------------------------------------- labels
def write_reads(path: Path, rows: dict[str, list[tuple[int | str, int | str, int | str]]]) -> Path:
    """reads.csv with labels ICH and SDH: rows = name -> [(R1, R2, R3) for ICH, (R1, R2, R3) for SDH]."""
    records = []
    for name, (ich, sdh) in rows.items():
        record = {"name": name, "Category": "x"}
        for r in range(3):
            record[f"R{r + 1}:ICH"], record[f"R{r + 1}:SDH"] = ich[r], sdh[r]
        records.append(record)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def test_reads_majority_vote(tmp_path: Path) -> None:
    path = write_reads(tmp_path / "reads.csv", {
        "CQ500-CT-1": [(1, 1, 0), (0, 0, 1)],
        "CQ500-CT-2": [(0, 1, 0), (1, 1, 1)],
        "CQ500-CT-3": [(1, 0, ""), ("", "", "")],  # a tie and no reads: unknown, not 0
    })
    reads = read_cq500(path)
    assert list(reads.columns) == ["ICH", "SDH"]
    assert reads.loc["CQ500CT1"].tolist() == [1, 0]
    assert reads.loc["CQ500CT2"].tolist() == [0, 1]
    assert reads.loc["CQ500CT3"].isna().all()
    with pytest.raises(InputError, match="not found"):
        read_cq500(tmp_path / "missing.csv")
    write_reads(path, {"CQ500-CT-1": [(1, 2, 0), (0, 0, 0)]})
    with pytest.raises(InputError, match="0, 1 or nothing"):
        read_cq500(path)


def test_labels_join_by_cq500_folder_and_unknown_patients_stay_empty(tmp_path: Path) -> None:
    reads = write_reads(tmp_path / "reads.csv", {"SYN-CT-1": [(1, 1, 0), (0, 0, 0)]})
    cfg = make_cfg(tmp_path, labels=reads, labels_format="cq500", patient_key="cq500_folder")
    write_series(cfg.src / "SYNCT1 SYNCT1" / "Unknown Study" / "CT", SeriesSpec(n_slices=8))
    write_series(cfg.src / "SYNCT2 SYNCT2" / "Unknown Study" / "CT", SeriesSpec(n_slices=8, centre=(0.0, 0.0, 2.5)))
    summary = run_ingest(cfg)
    labels = pd.read_csv(cfg.dest / store.LABELS, dtype=str, keep_default_na=False)
    pseudo = Pseudonymizer(TEST_KEY.encode())
    by_patient = labels.set_index("patient_id")
    assert by_patient.loc[pseudo.patient("SYNCT1"), ["ICH", "SDH"]].tolist() == ["1", "0"]
    assert by_patient.loc[pseudo.patient("SYNCT2"), ["ICH", "SDH"]].tolist() == ["", ""]
    assert summary["unlabelled_scans"] == 1
    manifest = store.read_manifest(cfg.dest)
    assert set(manifest["patient_key_source"]) == {"dataset"}
    with pytest.raises(InputError, match="not found"):
        run_ingest(cfg.model_copy(update={"labels": tmp_path / "nope.csv"}))


# ------------------------------------------------------------------------------------- privacy, resume, job
def test_job_outputs_carry_no_identifying_value(tmp_path: Path, sqlite_tracking) -> None:
    from pipelines.ingest import loggable_params, run

    cfg = make_cfg(tmp_path, workers=2, linkage=None)
    folder = cfg.src / "Doe^Jane 19700101" / "ACCZX991"  # folder names in real exports carry PHI too
    study, series = generate_uid(), generate_uid()
    paths = write_series(folder, SeriesSpec(n_slices=8), patient_id="PIDPLANTED77", patient_name="Plantedname^Zed",
                         study_uid=study, series_uid=series)
    write_series(folder / "bone", SeriesSpec(n_slices=8, kernel="BONE"), patient_id="PIDPLANTED77",
                 patient_name="Plantedname^Zed", study_uid=study)
    (folder / "broken.dcm").write_bytes(b"garbage")
    summary = run(cfg, JobContext(root=tmp_path, tracking=sqlite_tracking))
    assert summary["accepted"] == 1 and summary["files_unreadable"] == 1
    needles = ["PIDPLANTED77", "Plantedname", "Doe^Jane", "19700101", "ACCZX991", "Test Hospital", study, series,
               str(tmp_path / "src"), paths[0].name]
    outputs = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(cfg.src)
               and "private" not in p.parts]
    assert {p.name for p in outputs} >= {"manifest.parquet", "rejects.csv", "labels.csv", "preprocess.json",
                                        "metrics.json", "contact_sheet.png", "mlflow.db"}
    for path in outputs:
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            texts.append(pd.read_parquet(path).to_csv())
        for needle in needles:
            assert not any(needle in text for text in texts), f"{needle!r} found in {path}"
    linkage = tmp_path / "private" / "linkage" / "store.csv"  # default: <root>/private/linkage/<dest name>.csv
    assert series in linkage.read_text() and not linkage.is_relative_to(cfg.dest)
    assert not (cfg.dest / store.JOURNAL).exists()
    elsewhere = cfg.model_copy(update={"src": Path("/exports/Doe^Jane"), "dest": tmp_path / "MRN1234567"})
    logged = loggable_params(elsewhere, tmp_path)
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", logged["src"]) and re.fullmatch(r"sha256:[0-9a-f]{12}", logged["dest"])
    assert logged["report_dir"] == "reports" and logged["preprocess.shape"] == "[32, 32, 32]"
    assert loggable_params(cfg.model_copy(update={"src": Path("/exports/cq500")}), tmp_path)["src"] == "<outside>/cq500"


def test_resume_reuses_volumes_of_the_same_preprocess_version(tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(tmp_path)
    write_series(cfg.src / "a", SeriesSpec(n_slices=8), patient_id="PA0000001")
    write_series(cfg.src / "b", SeriesSpec(n_slices=8, centre=(0.0, 0.0, 2.5)), patient_id="PB0000001")
    # an interrupted first run: volumes written, the manifest never
    monkeypatch.setattr(store, "write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg)
    monkeypatch.undo()
    monkeypatch.setenv(KEY_ENV, TEST_KEY)  # undo() also removed the key the autouse fixture set
    volumes = sorted((cfg.dest / store.VOLUMES).glob("*.npy"))
    assert len(volumes) == 2 and (cfg.dest / store.JOURNAL).is_file()
    stamps = [os.stat(p).st_mtime_ns for p in volumes]
    summary = run_ingest(cfg)
    assert (summary["converted"], summary["reused"]) == (0, 2)
    assert [os.stat(p).st_mtime_ns for p in volumes] == stamps
    assert run_ingest(cfg)["reused"] == 2  # and again from the manifest
    np.save(volumes[0], np.zeros((2, 2, 2), np.int16))  # a volume that no longer matches its manifest row
    assert (run_ingest(cfg)["converted"], np.load(volumes[0]).shape) == (1, SPEC.shape)
    # another recipe: refused into this store (tests/test_store_guards.py), converted afresh with rebuild
    changed = cfg.model_copy(update={"preprocess": SPEC.model_copy(update={"spacing_mm": 5.0}), "rebuild": True})
    assert run_ingest(changed)["converted"] == 2
    assert json.loads((cfg.dest / store.PREPROCESS).read_text())["version"] == changed.preprocess.version


def test_undecodable_pixels_fall_back_to_the_next_series(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    study = generate_uid()
    plain = write_series(cfg.src / "plain", SeriesSpec(n_slices=8), study_uid=study)
    write_series(cfg.src / "bone", SeriesSpec(n_slices=8, kernel="H70h"), study_uid=study)
    data = plain[3].read_bytes()
    plain[3].write_bytes(data[: len(data) - 2000])  # truncated pixel data
    summary = run_ingest(cfg)
    _, _, row = only_volume(cfg)
    assert row["kernel"] == "H70h"
    assert summary["rejected"] == {"unreadable": 1}
    message = pd.read_csv(cfg.dest / store.REJECTS)["message"].iloc[0]
    assert "pixel data" in message and str(tmp_path) not in message
