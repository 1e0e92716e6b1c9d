"""The synthetic head-CT generator: determinism, tissue HU, DICOM geometry and values, labels, privacy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from headct.config import LABELS, SynthConfig
from headct.data.formats.dicom import is_synthetic
from headct.data.synth import clinical, dataset, findings, plan, study, template
from headct.errors import InputError

TINY = dict(n_patients=6, matrix=64, pixel_mm=3.6, extra_series_fraction=1.0, workers=1, seed=3)


def _cfg(tmp: Path, **kw) -> SynthConfig:
    return SynthConfig(**{**TINY, "out": tmp / "raw", "montage": tmp / "reports" / "montage.png", **kw})


def _series_dirs(study_dir: Path) -> list[Path]:
    return sorted(p for p in (study_dir / "Unknown Study").iterdir() if p.is_dir())


def _pixels(raw: Path) -> dict[str, bytes]:
    return {str(f.relative_to(raw)): pydicom.dcmread(f).PixelData for f in dataset.dicom_files(raw)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A generated tiny set: (config, plans, results), every study with extra series."""
    tmp = tmp_path_factory.mktemp("synth")
    cfg = _cfg(tmp)
    plans = plan.plan_studies(cfg)
    results = dataset.generate(cfg, cfg.out, plans, progress=False)
    return cfg, plans, results


# ------------------------------------------------------------------------------------------- determinism
def _generate(tmp: Path, **kw) -> tuple[dict[str, bytes], bytes]:
    cfg = _cfg(tmp, n_patients=2, extra_series_fraction=0.0, **kw)
    dataset.generate(cfg, cfg.out, progress=False)
    return _pixels(cfg.out), (cfg.out / "reads.csv").read_bytes()


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first, again, other = (_generate(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert again == first and len(first[0]) > 40
    assert other[0].keys() != first[0].keys() or all(other[0][k] != v for k, v in first[0].items())
    assert other[1] != first[1]


@pytest.mark.slow
def test_a_process_pool_does_not_change_a_byte(tmp_path: Path) -> None:
    assert _generate(tmp_path / "pool", workers=2) == _generate(tmp_path / "serial", workers=1)


# -------------------------------------------------------------------------------------------- tissue HU
def test_tissue_hu_on_clean_phantom_and_noise_in_reconstruction(tiny) -> None:
    cfg, plans, _ = tiny
    normal = dataclasses.replace(plans[0], findings=())
    head = study.render_phantom(normal, cfg.seed, 230.0, 5.0)
    s = head.subject
    pure = head.tissue > 0.97
    grey, white = head.hu[pure & (head.share < 0.15)], head.hu[pure & (head.share > 0.85)]
    assert 35 <= grey.mean() <= 45 and 20 <= white.mean() <= 30 and grey.mean() > white.mean() + 5
    csf = head.hu[(head.ventricle > 0.97) & (head.env < -10)]
    assert csf.size > 100 and 0 <= np.median(csf) <= 15
    skull = head.hu[(head.bone > 0.97) & (head.t[2] > 20)]
    assert np.median(skull) > 700 and np.percentile(skull, 95) > 1100
    air = head.hu[(head.env > s.scalp_extent_mm + 3) & (head.t[2] > 10)]
    assert np.all(air <= -999)
    # Noise in the brain of the main series: noisy minus noise-free reconstruction.
    noisy = study.reconstruct_series(normal, head, "axial", cfg.seed, 256, 0.9)
    clean = study.reconstruct_series(normal, head, "axial", cfg.seed, 256, 0.9, noise=False)
    k = int(np.argmin(np.abs(noisy.positions[:, 2] - normal.table_z - s.to_patient(np.array([0, -18, 30.]))[2])))
    brain = (clean.hu[k] > 15) & (clean.hu[k] < 50)
    sd = (noisy.hu[k] - clean.hu[k])[brain].std()
    assert brain.sum() > 5000 and 2.9 <= sd <= 6.2  # 3-6 HU, with the sampling error of the estimate


# ----------------------------------------------------------------------------------------------- DICOM
def test_dicom_round_trip_geometry_and_hu(tiny) -> None:
    cfg, plans, results = tiny
    kinds = set()
    for p in plans:
        for folder in _series_dirs(cfg.out / p.folder):
            files = [pydicom.dcmread(f) for f in folder.iterdir()]
            first = files[0]
            assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
            assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert first.BodyPartExamined == "HEAD" and first.PatientPosition == "HFS"
            assert all(is_synthetic(ds) for ds in files)  # the marker that admits the demo pseudonym key
            kinds.add(first.ImageType[-1])
            if first.ImageType[-1] == "LOCALIZER":
                assert len(files) == 1
                continue
            iop = np.array(first.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            files.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
            steps = np.diff([np.dot(ds.ImagePositionPatient, normal) for ds in files])
            assert np.allclose(steps, float(first.SpacingBetweenSlices), atol=1e-3)
            assert np.allclose(steps, float(first.SliceThickness), atol=1e-3)
    assert kinds == {"AXIAL", "LOCALIZER"}
    # HU read back equal the array the scanner model produced (main series of study 1).
    p = plans[1]
    head = study.render_phantom(p, cfg.seed, cfg.matrix * cfg.pixel_mm, max(
        s.recon.thickness_mm for s in p.series if s.recon))
    stack = study.reconstruct_series(p, head, "axial", cfg.seed, cfg.matrix, cfg.pixel_mm)
    files = [pydicom.dcmread(f) for f in (cfg.out / results[1].main_series).iterdir()]
    files.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in files])
    inside = hu > -1025  # outside the reconstruction circle some vendors store padding
    assert inside.mean() > 0.7 and np.array_equal(hu[inside], stack.hu[inside])


def test_left_sided_lesion_is_on_the_patients_left(tiny, tmp_path: Path) -> None:
    cfg, plans, _ = tiny
    tpl = template.load_template()
    iph = findings.sample_finding("IPH", np.random.default_rng(0), tpl, volume_ml=40.0, side="L")
    iph = dataclasses.replace(iph, push=None)  # no mass effect: only the haematoma changes the image
    assert iph.centre[0] < 0  # template (RAS) x < 0 is the left hemisphere
    base = dataclasses.replace(plans[0], findings=())
    lesioned = dataclasses.replace(plans[0], findings=(iph,))
    images = []
    for p in (base, lesioned):
        head = study.render_phantom(p, cfg.seed, 230.0, 5.0)
        images.append(study.reconstruct_series(p, head, "axial", cfg.seed, 128, 1.8, noise=False))
    header = dataclasses.replace(plans[0].series[1].header, padding=None)
    from headct.data.synth.dicom_writer import write_axial

    write_axial(tmp_path / "s", images[1], plans[0].study, header, "test")
    files = sorted((pydicom.dcmread(f) for f in (tmp_path / "s").iterdir()),
                   key=lambda ds: float(ds.ImagePositionPatient[2]))
    written = np.stack([ds.pixel_array.astype(float) for ds in files]) + float(files[0].RescaleIntercept)
    diff = written - images[0].hu
    k, r, c = (np.argwhere(diff > 20).mean(axis=0))
    ds = files[int(round(k))]
    iop = np.array(ds.ImageOrientationPatient, float)
    lps = np.array(ds.ImagePositionPatient, float) + c * float(ds.PixelSpacing[1]) * iop[:3] \
        + r * float(ds.PixelSpacing[0]) * iop[3:]
    assert lps[0] > 10.0  # DICOM LPS: +x is the patient's left


# ---------------------------------------------------------------------------------------------- privacy
def test_identifying_values_unique_long_and_nowhere_else(tiny) -> None:
    cfg, plans, _ = tiny
    per_study = []
    for p in plans:
        values = set()
        for folder in _series_dirs(cfg.out / p.folder):
            ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            values |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber,
                       ds.InstitutionName}
        assert len(values) == 5 and all(len(v) >= 8 for v in values)
        per_study.append(values)
    everything = set().union(*per_study)
    assert len(everything) == 5 * len(plans)  # no value shared between studies
    found = dataset.identifying_values(cfg.out)
    assert everything <= found and dataset.raw_uids(cfg.out) <= found
    texts = [(cfg.out / name).read_text() for name in ("reads.csv", "truth.csv")]
    paths = [str(p.relative_to(cfg.out)) for p in cfg.out.rglob("*")]
    for value in everything:
        assert not any(value in text for text in texts), value
        assert not any(value in path for path in paths), value


# ------------------------------------------------------------------------------------------------ labels
def test_reads_majority_is_the_truth_and_readers_differ_only_where_flipped(tmp_path: Path) -> None:
    cfg = SynthConfig(n_patients=60, reader_disagreement=0.2, seed=1)
    plans = plan.plan_studies(cfg)
    dataset.write_reads(tmp_path / "reads.csv", plans)
    reads = dataset.read_reads(tmp_path / "reads.csv")
    flips = 0
    for p in plans:
        for label in LABELS:
            votes = reads[p.name][label]
            assert int(sum(votes) >= 2) == p.labels[label]
            flipped = {int(r[1]) - 1 for r, lab in p.flips if lab == label}
            assert {i for i, v in enumerate(votes) if v != p.labels[label]} == flipped
            flips += len(flipped)
    assert 0.1 < flips / (len(plans) * len(LABELS)) < 0.3


def test_default_mix_is_cqs500_shaped_and_derived_labels_follow_findings() -> None:
    cfg = SynthConfig(n_patients=300, seed=2)
    plans = plan.plan_studies(cfg)
    n = len(plans)
    for kind, p in cfg.prevalence.items():  # exact counts, up to rounding
        assert sum(kind in {f.kind for f in q.findings} for q in plans) == round(p * n), kind
    ich = [q for q in plans if q.labels["ICH"]]
    assert len(ich) == round(cfg.ich_prevalence * n)
    subtypes = [len({f.kind for f in q.findings} & set(findings.BLEEDS)) for q in ich]
    assert min(subtypes) >= 1 and 1.3 <= np.mean(subtypes) <= 1.6  # CQ500: 288 subtype reads / 205 ICH
    negatives = [q for q in plans if not q.labels["ICH"]]
    assert np.mean([not q.findings for q in negatives]) > 0.85  # most negatives are normal
    with_ivh = [q for q in plans if q.labels["IVH"]]
    assert np.mean([q.labels["IPH"] for q in with_ivh]) > 0.5  # IVH mostly extends a parenchymal bleed
    assert 0.1 <= np.mean([q.labels["MassEffect"] for q in plans]) <= 0.4  # measured, CQ500 25.9%
    for q in plans:
        kinds = {f.kind for f in q.findings}
        assert q.labels["ICH"] == int(bool(kinds & set(findings.BLEEDS)))
        assert q.labels["Fracture"] == int(bool(kinds & {"CalvarialFracture", "OtherFracture"}))
        assert q.labels["MidlineShift"] == int(q.midline_shift_mm >= 5.0)
        assert q.labels["MassEffect"] >= q.labels["MidlineShift"]
        if q.labels["BleedLocation-Left"] or q.labels["BleedLocation-Right"]:
            assert q.labels["ICH"]
        for f in q.findings:
            assert (f.kind in clinical.VOLUME_ML) == ("volume_ml" in f.params)


def test_larger_lesions_shift_the_midline_more() -> None:
    tpl = template.load_template()
    subject = plan.plan_studies(SynthConfig(n_patients=2, seed=4))[0].subject
    shifts = []
    for volume in (2.0, 20.0, 80.0):
        rng = np.random.default_rng(7)
        iph = findings.sample_finding("IPH", rng, tpl, volume_ml=volume, side="R")
        shifts.append(findings.measure_mass_effect((iph,), subject, tpl)[0])
    assert shifts[0] < 1.0 < shifts[1] < shifts[2] and shifts[2] >= 5.0


def test_enriched_independent_mix_is_still_available() -> None:
    enriched = dict.fromkeys(findings.FINDINGS, 0.2)
    plans = plan.plan_studies(SynthConfig(n_patients=50, seed=1, prevalence=enriched, ich_prevalence=None))
    for kind in findings.FINDINGS:
        assert sum(kind in {f.kind for f in q.findings} for q in plans) == 10
    with pytest.raises(ValueError, match="ich_prevalence"):
        SynthConfig(prevalence=enriched, ich_prevalence=0.1)  # a kind more frequent than any haemorrhage


# --------------------------------------------------------------------------------------------- re-runs
def test_rerun_replaces_the_folder_and_refuses_foreign_ones(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, n_patients=2, extra_series_fraction=0.0)
    plans = plan.plan_studies(cfg)
    for subset in (plans, plans[:1]):
        with dataset.replacing(cfg.out) as staging:
            dataset.generate(cfg, staging, subset, progress=False)
    assert sorted(p.name for p in cfg.out.iterdir() if p.is_dir()) == ["SYNCT0 SYNCT0"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    with pytest.raises(InputError, match="not made by"), dataset.replacing(foreign):
        pass
    assert (foreign / "thesis.txt").exists()
