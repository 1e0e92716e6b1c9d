"""Render one planned study and write its DICOM series (runs inside the worker processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headct.data.synth import dicom_writer, lesions, oracle, scanner
from headct.data.synth.anatomy import phantom_grid
from headct.data.synth.phantom import Head, render_head
from headct.data.synth.plan import StudyPlan, study_rng
from headct.data.synth.template import load_template

STUDY_FOLDER = "Unknown Study"


@dataclass(frozen=True)
class StudyResult:
    index: int
    bytes: int
    n_series: int
    n_files: int
    main_series: str  # folder of the main series, relative to the data-set root
    key_slices: dict[str, int]  # finding kind (and "any") -> stack index (inferior first) in the main series
    volumes_ml: dict[str, float] = field(default_factory=dict)  # finding kind -> painted volume (mL)
    visible: dict[tuple[str, float], int] = field(default_factory=dict)  # ORACLE: (group, spacing mm) -> voxels
    oracle_series: str = ""  # the series the oracle follows (the one ingest selects)
    oracle_noise_hu: float = 0.0  # its noise SD in the brain


def render_phantom(plan: StudyPlan, seed: int, fov_mm: float, margin_mm: float,
                   profiles: dict[str, np.ndarray] | None = None,
                   painted: list[oracle.Painted] | None = None) -> Head:
    """The study's head with its findings painted in (HU on the 1.5 mm phantom grid).

    `profiles`, if given, receives per finding kind how much was painted in each phantom z plane; `painted`,
    if given, each finding's volume and exact HU change (for the truth table and the oracle)."""
    tpl = load_template()
    z_lo, z_hi = plan.coverage_mm
    bulge = 12.0 if any(f.params.get("scalp_haematoma") for f in plan.findings) else 0.0
    grid = phantom_grid(tpl, plan.subject, (z_lo - margin_mm, z_hi + margin_mm), fov_mm,
                        plan.subject.scalp_extent_mm + bulge)
    pushes = tuple(f.push for f in plan.findings if f.push is not None)
    head = render_head(tpl, plan.subject, grid, pushes)
    rng = study_rng(seed, plan.index, 4)  # the painters' own randomness (lesion outlines)
    for finding in sorted(plan.findings, key=lambda f: lesions.PAINT_ORDER.index(f.kind)):
        before = head.lesion.sum(axis=(0, 1)) if profiles is not None else None
        hu_before = head.hu.copy() if painted is not None else None
        volume = lesions.paint(head, finding, tpl, rng)
        if painted is not None:
            painted.append(oracle.Painted(finding.kind, volume, *oracle.crop_change(hu_before, head.hu)))
        if profiles is not None:
            profiles[finding.kind] = profiles.get(finding.kind, 0.0) + head.lesion.sum(axis=(0, 1)) - before
    return head


def selected_kind(plan: StudyPlan) -> str:
    """The series ingest's default rules select (headct/data/selection.py): soft kernel, thickness in range,
    equal coverage, then more slices, so the thin series when the study has one, else the main axial."""
    return "thin" if any(s.kind == "thin" for s in plan.series) else "axial"


def reconstruct_series(plan: StudyPlan, head: Head, kind: str, seed: int, matrix: int, pixel_mm: float,
                       noise: bool = True) -> scanner.SliceStack:
    """Reconstruct one axial series of the plan from its phantom (noise can be switched off for tests)."""
    series = next((s for s in plan.series if s.kind == kind and s.recon is not None), None)
    if series is None or series.recon is None:
        raise ValueError(f"{plan.name} has no reconstructed {kind!r} series")
    recon = series.recon
    if not noise:
        recon = scanner.Reconstruction(recon.thickness_mm, recon.spacing_mm, recon.psf_mm, 0.0,
                                       recon.noise_grain_px, recon.sharpen, 0.0)
    z = scanner.slice_centres(*plan.coverage_mm, recon.spacing_mm)
    rng = study_rng(seed, plan.index, 5, series.header.number)
    return scanner.reconstruct(head.hu, head.grid, recon, z, matrix, pixel_mm, plan.table_z, rng)


def write_study(plan: StudyPlan, root: Path, seed: int, matrix: int, pixel_mm: float) -> StudyResult:
    """Render the study and write every series under `root/<folder>/Unknown Study/<SeriesDescription>/`."""
    thickest = max(s.recon.thickness_mm for s in plan.series if s.recon is not None)
    profiles: dict[str, np.ndarray] = {}
    painted: list[oracle.Painted] = []
    head = render_phantom(plan, seed, matrix * pixel_mm, thickest, profiles, painted)
    study_dir = root / plan.folder / STUDY_FOLDER
    total = files = 0
    main, keys = "", {}
    for series in plan.series:
        folder = study_dir / series.header.description
        entropy = (seed, plan.index)
        if series.kind == "localizer":
            image, top_left, spacing = scanner.localizer(head.hu, head.grid, plan.table_z)
            total += dicom_writer.write_localizer(folder, image, top_left, spacing, plan.study, series.header,
                                                  entropy)
            files += 1
            continue
        stack = reconstruct_series(plan, head, series.kind, seed, matrix, pixel_mm)
        total += dicom_writer.write_axial(folder, stack, plan.study, series.header, entropy)
        files += len(stack.hu)
        if series.kind == "axial":
            main = str(folder.relative_to(root))
            keys = key_slices(plan, head, stack, profiles)
    volumes: dict[str, float] = {}
    for item in painted:
        volumes[item.kind] = volumes.get(item.kind, 0.0) + item.volume_ml
    chosen = next(s for s in plan.series if s.kind == selected_kind(plan) and s.recon is not None)
    recon = chosen.recon
    z = scanner.slice_centres(*plan.coverage_mm, recon.spacing_mm)
    visible = oracle.visible_voxels(painted, head.grid, recon, z, matrix, pixel_mm)
    return StudyResult(plan.index, total, len(plan.series), files, main, keys, volumes, visible, chosen.kind,
                       recon.noise_hu)


def key_slices(plan: StudyPlan, head: Head, stack: scanner.SliceStack,
               profiles: dict[str, np.ndarray]) -> dict[str, int]:
    """Per finding kind the slice showing most of it; "any" for all together (or, in a normal study, the
    level of the lateral ventricles)."""
    z_planes = head.grid.axis(2)
    z_slices = stack.positions[:, 2] - plan.table_z
    slabs = [np.abs(z_planes - z) <= stack.thickness_mm / 2 for z in z_slices]
    level = plan.subject.to_patient(np.array([0.0, -18.0, 14.0]))[2]
    keys = {"any": int(np.argmin(np.abs(z_slices - level)))}
    total = sum(profiles.values()) if profiles else None
    for kind, profile in ({**profiles, "any": total} if profiles else {}).items():
        amount = [float(profile[slab].sum()) for slab in slabs]
        if max(amount) > 0:
            keys[kind] = int(np.argmax(amount))
    for f in plan.findings:  # a fracture line is best seen through its centre, not where its haematoma is
        if f.kind in ("CalvarialFracture", "OtherFracture"):
            keys[f.kind] = int(np.argmin(np.abs(z_slices - plan.subject.to_patient(np.array(f.centre))[2])))
    return keys
