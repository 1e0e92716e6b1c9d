"""The generator's truth table, the oracle feature and the store-side meta.csv.

The oracle must be what it claims: a finding's exact contribution to the noise-free image of the series ingest
selects, counted at the store's grid where it exceeds the noise. Volumes must be painted volumes in mL.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.config import IngestConfig, JobContext, PreprocessSpec, SynthConfig
from headct.data.store_meta import META, meta_table, write_store_meta
from headct.data.synth import dataset, findings, oracle, plan, scanner, study, template, truth
from headct.errors import InputError

TINY = dict(n_patients=4, matrix=64, pixel_mm=3.6, workers=1, seed=5, extra_series_fraction=1.0)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """A tiny generated set: (config, plans, results)."""
    tmp = tmp_path_factory.mktemp("truth")
    cfg = SynthConfig(**TINY, out=tmp / "raw", montage=tmp / "montage.png")
    plans = plan.plan_studies(cfg)
    return cfg, plans, dataset.generate(cfg, cfg.out, plans, progress=False)


def _one_finding_plan(plans, finding: findings.Finding):
    """The first plan's patient with only `finding` (no mass effect)."""
    return dataclasses.replace(plans[0], findings=(dataclasses.replace(finding, push=None),))


def _axial(p) -> scanner.Reconstruction:
    return next(s.recon for s in p.series if s.kind == "axial")


# ----------------------------------------------------------------------------------------------- strata
@pytest.mark.parametrize(("volume", "stratum"), [(0.0, ""), (math.nan, ""), (0.01, "<5mL"), (4.999, "<5mL"),
                                                 (5.0, "5-30mL"), (29.99, "5-30mL"), (30.0, ">30mL"),
                                                 (400.0, ">30mL")])
def test_strata_boundaries_in_ml(volume: float, stratum: str) -> None:
    assert truth.stratum_of(volume) == stratum


def test_finding_vocabulary_is_one_tuple() -> None:
    assert findings.FINDINGS is truth.FINDINGS and set(truth.BLEEDS) < set(truth.FINDINGS)
    assert set(truth.ORACLE_GROUP_OF_LABEL) <= {"ICH", "Fracture", *truth.FINDINGS}


# ------------------------------------------------------------------------------------------- volumes
def test_painted_volume_of_a_round_haematoma_is_its_geometric_volume(generated) -> None:
    cfg, plans, _ = generated
    tpl = template.load_template()
    iph = findings.sample_finding("IPH", np.random.default_rng(1), tpl, volume_ml=40.0, side="R")
    iph = dataclasses.replace(iph, params={**iph.params, "radius": 12.0, "irregular": 0.0})
    painted: list[oracle.Painted] = []
    study.render_phantom(_one_finding_plan(plans, iph), cfg.seed, 230.0, 5.0, painted=painted)
    scale = np.prod(plans[0].subject.scale)  # the template -> patient warp scales volumes
    expected = 4 / 3 * np.pi * 12.0**3 / 1000 * scale
    assert painted[0].kind == "IPH" and painted[0].volume_ml == pytest.approx(expected, rel=0.1)


# -------------------------------------------------------------------------------------------- oracle
def test_oracle_change_is_the_difference_of_two_noise_free_reconstructions(generated) -> None:
    cfg, plans, _ = generated
    tpl = template.load_template()
    sdh = findings.sample_finding("SDH", np.random.default_rng(2), tpl, volume_ml=30.0, side="L")
    p = _one_finding_plan(plans, sdh)
    painted: list[oracle.Painted] = []
    head = study.render_phantom(p, cfg.seed, 230.0, 5.0, painted=painted)
    item = painted[0]
    unpainted = head.hu.copy()
    unpainted[item.box] -= item.delta
    recon = dataclasses.replace(_axial(p), noise_hu=0.0, streak_hu=0.0)
    z = scanner.slice_centres(*p.coverage_mm, recon.spacing_mm)
    rng = np.random.default_rng(0)
    with_it, without = (scanner.reconstruct(hu, head.grid, recon, z, 128, 1.8, 0.0, rng).hu
                        for hu in (head.hu, unpainted))
    image, rows, cols = oracle.series_change(item, head.grid, recon, z, 128, 1.8)
    change = np.zeros_like(with_it)
    change[:, rows, cols] = image
    assert np.abs(change).max() > 20  # a real lesion, not an empty comparison
    assert np.abs((with_it - without) - change).max() <= 1.0  # the reconstruction rounds to whole HU


def test_count_visible_counts_grid_points_above_threshold() -> None:
    change = np.zeros((20, 40, 40), np.float32)
    change[5:10, 10:20, 10:30] = 10.0  # 5 slices x 10 rows x 20 columns
    same = oracle.count_visible(change, 5.0, (1.0,), pixel_mm=1.0, slice_step_mm=1.0)
    assert same == {1.0: 5 * 10 * 20}
    assert oracle.count_visible(-change, 5.0, (1.0,), 1.0, 1.0) == same  # darker lesions count too
    coarse = oracle.count_visible(change, 5.0, (2.0,), 1.0, 1.0)[2.0]
    assert 0.6 * 1000 / 8 <= coarse <= 1.4 * 1000 / 8
    assert oracle.count_visible(change, 11.0, (1.0, 2.0), 1.0, 1.0) == {1.0: 0, 2.0: 0}


def test_oracle_grows_with_size_and_vanishes_without_contrast_or_under_noise(generated) -> None:
    cfg, plans, _ = generated
    tpl = template.load_template()
    base = findings.sample_finding("IPH", np.random.default_rng(3), tpl, volume_ml=40.0, side="R")

    def visible(radius: float, noise: float = 4.0) -> int:
        params = {**base.params, "radius": radius, "irregular": 0.0}
        p = _one_finding_plan(plans, dataclasses.replace(base, params=params))
        painted: list[oracle.Painted] = []
        head = study.render_phantom(p, cfg.seed, 230.0, 5.0, painted=painted)
        recon = dataclasses.replace(_axial(p), noise_hu=noise)
        z = scanner.slice_centres(*p.coverage_mm, recon.spacing_mm)
        return oracle.visible_voxels(painted, head.grid, recon, z, 128, 1.8)[("IPH", 3.0)]

    small, large = visible(4.0), visible(12.0)
    assert 0 < small < large
    assert large > 0.5 * (4 / 3 * np.pi * 12.0**3) / 27  # most of a 12 mm haematoma's 3 mm voxels are seen
    assert visible(12.0, noise=20.0) < large  # more noise, fewer voxels above it
    assert visible(12.0, noise=1000.0) == 0


# ----------------------------------------------------------------------------------------- truth.csv
def test_truth_csv_holds_measured_volumes_strata_and_the_oracle(generated) -> None:
    cfg, plans, results = generated
    table = truth.read_truth(cfg.out / truth.TRUTH)
    assert list(table["name"]) == [p.name for p in plans]
    for p, r, (_, row) in zip(plans, results, table.iterrows(), strict=True):
        kinds = {f.kind for f in p.findings}
        assert {k for k in truth.FINDINGS if row[f"{k}_ml"] > 0} == {k for k in kinds if r.volumes_ml[k] > 0}
        bleed = sum(row[f"{k}_ml"] for k in truth.BLEEDS if k in kinds)
        assert row["bleed_ml"] == pytest.approx(bleed, abs=0.01)
        assert row["stratum"] == truth.stratum_of(row["bleed_ml"])
        assert (row["bleed_ml"] > 0) == bool(p.labels["ICH"])
        assert row["oracle_series"] == study.selected_kind(p)
        for group in truth.ORACLE_GROUPS:
            present = group in kinds or (group == "bleed" and kinds & set(truth.BLEEDS)) or (
                group == "fracture" and kinds & set(truth.FRACTURES))
            if not present:
                assert row[truth.visible_column(group, 3.0)] == 0
        coarse, fine = (row[truth.visible_column("bleed", s)] for s in (6.0, 2.0))
        assert coarse <= fine  # a coarser grid has fewer voxels to see a lesion with


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.drop(columns=["bleed_ml"]), "missing truth column"),
    (lambda t: t.assign(IPH_ml="big"), "not a number"),
    (lambda t: t.assign(visible_bleed_3mm=-1), "negative"),
    (lambda t: t.assign(name="SYN-CT-0"), "once"),
    (lambda t: t.assign(stratum=">30mL"), "expected"),
])
def test_malformed_truth_is_an_error_naming_the_file(generated, tmp_path: Path, edit, message: str) -> None:
    cfg, _, _ = generated
    bad = tmp_path / "truth.csv"
    edit(pd.read_csv(cfg.out / truth.TRUTH, dtype=str, keep_default_na=False)).to_csv(bad, index=False)
    with pytest.raises(InputError, match=message) as err:
        truth.read_truth(bad)
    assert str(bad) in str(err.value)


# ------------------------------------------------------------------------------------------ meta.csv
def test_meta_table_joins_by_study_folder_at_the_store_spacing(tmp_path: Path) -> None:
    rows = [{"name": f"SYN-CT-{i}", "bleed_ml": v, "stratum": truth.stratum_of(v), "IPH_ml": v or "",
             **{truth.visible_column(g, s): 10 * i + s for g in truth.ORACLE_GROUPS for s in truth.ORACLE_SPACINGS_MM},
             "reader_flips": "R1:ICH", "age": 50} for i, v in enumerate((0.0, 12.0))]
    truth.write_truth(tmp_path / "truth.csv", rows)
    table = truth.read_truth(tmp_path / "truth.csv")
    src = tmp_path / "raw"
    linkage = pd.DataFrame({
        "scan_id": ["ser_b", "ser_a", "ser_x", "ser_c"], "patient_id": ["pat_1", "pat_0", "pat_1", "pat_9"],
        "status": ["accepted", "accepted", "not_selected", "accepted"],
        "source_folder": [str(src / "SYNCT1 SYNCT1/Unknown Study/CT PLAIN"), str(src / "SYNCT0 SYNCT0/Unknown Study/A"),
                          str(src / "SYNCT1 SYNCT1/Unknown Study/BONE"), str(src / "OTHER/x")]})
    meta = meta_table(table, linkage, src, 3.0)
    assert list(meta["scan_id"]) == ["ser_a", "ser_b"]  # accepted scans of known studies only
    assert list(meta["patient_id"]) == ["pat_0", "pat_1"] and list(meta["bleed_ml"]) == [0.0, 12.0]
    assert list(meta["visible_bleed"]) == [3, 13] and list(meta["stratum"].fillna("")) == ["", "5-30mL"]
    assert not {"name", "reader_flips", "age"} & set(meta.columns)
    assert not any(c.endswith("mm") and c.startswith("visible") for c in meta.columns)
    assert not any(c.startswith("visible") for c in meta_table(table, linkage, src, 2.5).columns)


def test_ingest_writes_meta_keyed_by_pseudonyms_for_the_selected_series(generated, tmp_path: Path,
                                                                         sqlite_tracking) -> None:
    from headct.data import store
    from pipelines.ingest import run

    cfg_synth, plans, _ = generated
    cfg = IngestConfig(src=cfg_synth.out, dest=tmp_path / "store", labels=cfg_synth.out / "reads.csv",
                       workers=1, report_dir=tmp_path / "reports",
                       preprocess=PreprocessSpec(shape=(32, 32, 32), spacing_mm=6.0))
    run(cfg, JobContext(root=tmp_path, tracking=sqlite_tracking))
    meta = pd.read_csv(cfg.dest / META, dtype=str, keep_default_na=False)
    manifest = store.read_manifest(cfg.dest)
    assert sorted(meta["scan_id"]) == sorted(manifest["scan_id"]) and len(meta) == len(plans)
    joined = meta.merge(manifest, on="scan_id", suffixes=("", "_manifest"))
    assert (joined["patient_id"] == joined["patient_id_manifest"]).all()
    thin = joined["oracle_series"] == "thin"  # the oracle followed the series ingest selected
    assert (joined.loc[thin, "slice_thickness_mm"].astype(float) < 2).all()
    assert (joined.loc[~thin, "slice_thickness_mm"].astype(float) == cfg_synth.slice_thickness_mm).all()
    text = (cfg.dest / META).read_text()
    assert "SYN-CT" not in text and "SYNCT" not in text and str(tmp_path) not in text
    assert "visible_bleed" in meta.columns  # 6 mm is one of the oracle's spacings
    (cfg_synth.out / truth.TRUTH).rename(tmp_path / "kept.csv")  # real data: no truth -> no (stale) meta.csv
    try:
        assert write_store_meta(cfg, tmp_path) is None and not (cfg.dest / META).exists()
        (cfg_synth.out / truth.TRUTH).write_text("name,oops\n")
        with pytest.raises(InputError, match="truth.csv"):
            write_store_meta(cfg, tmp_path)
    finally:
        (tmp_path / "kept.csv").replace(cfg_synth.out / truth.TRUTH)
