"""The plan of a synthetic data set: every random choice of every study, made before any pixel is rendered.

Findings are assigned globally so each one reaches its configured prevalence exactly, up to rounding
(`synth.prevalence`, `synth.ich_prevalence`; the clinical defaults and their sources are in clinical.py): first
the ICH-positive studies, then the haemorrhage subtypes within them, so that each has at least one and clinical
pairs go together, then fractures (an EDH usually has a calvarial fracture over it) and tumours. Everything else
about study i comes from generators seeded with (seed, i, purpose), so the process pool does not change a
study's anatomy or pixels.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from headct.config.base import LABELS
from headct.config.data import SynthConfig
from headct.data.synth import clinical
from headct.data.synth.anatomy import Subject, sample_subject
from headct.data.synth.dicom_writer import SeriesHeader, StudyHeader, make_uid
from headct.data.synth.findings import BLEEDS, FINDINGS, Finding, derive_labels, sample_finding
from headct.data.synth.scanner import Reconstruction
from headct.data.synth.template import Template, load_template

VENDORS = {  # manufacturer: (weight, models, soft kernels, bone kernels, signed, intercept, padding, scout name)
    "GE MEDICAL SYSTEMS": (0.35, ("LightSpeed VCT", "Revolution CT", "Optima CT660", "Discovery CT750 HD"),
                           ("STANDARD", "SOFT"), ("BONE", "BONEPLUS"), True, -1024.0, -2000, "SCOUT"),
    "SIEMENS": (0.35, ("SOMATOM Definition AS+", "SOMATOM Force", "SOMATOM go.Up", "Sensation 64"),
                ("H30s", "H31s", "J40s", "Hr38"), ("H70h", "Hr64", "J70h"), False, -1024.0, None,
                "Topogram 0.6 T20s"),
    "Philips": (0.15, ("Brilliance 64", "iCT 256", "Ingenuity CT"), ("UB", "UC"), ("D", "YD"), False, -1024.0,
                None, "Surview"),
    "TOSHIBA": (0.15, ("Aquilion ONE", "Aquilion Prime"), ("FC21", "FC26"), ("FC30", "FC81"), True, 0.0, None,
                "Scanogram"),
}
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class SeriesPlan:
    kind: str  # "axial" (the main thick series), "thin", "bone" or "localizer"
    header: SeriesHeader
    recon: Reconstruction | None  # None for the localizer


@dataclass(frozen=True)
class StudyPlan:
    index: int
    name: str  # reads.csv name, "SYN-CT-<n>"
    folder: str  # "SYNCT<n> SYNCT<n>"
    subject: Subject
    findings: tuple[Finding, ...]  # bleeds and tumours carry their planned volume (params["volume_ml"])
    labels: dict[str, int]  # the truth
    reads: tuple[dict[str, int], dict[str, int], dict[str, int]]  # R1-R3
    flips: tuple[tuple[str, str], ...]  # (reader, label) where one reader disagreed
    midline_shift_mm: float
    displacement_mm: float
    study: StudyHeader
    series: tuple[SeriesPlan, ...]
    coverage_mm: tuple[float, float]  # patient z of the main series' first slab bottom and last slab top
    table_z: float  # DICOM z offset (table position)


def study_rng(seed: int, index: int, purpose: int, *extra: int) -> np.random.Generator:
    """The generator for one purpose of one study: independent of the pool and of the data-set size."""
    return np.random.default_rng([seed, index, purpose, *extra])


def plan_studies(cfg: SynthConfig, tpl: Template | None = None) -> list[StudyPlan]:
    """Plan every study of the data set (cheap: no pixels)."""
    tpl = tpl or load_template()
    n = cfg.n_patients
    assigned = _assign_findings(cfg, n)
    plans = []
    birth_dates: set[str] = set()
    for i in range(n):
        plans.append(_plan_study(cfg, tpl, i, assigned[i], birth_dates))
    return plans


def _pick(rng: np.random.Generator, candidates: list[int], count: int, weights: list[float]) -> list[int]:
    """`count` of `candidates` drawn without replacement with probability proportional to `weights`."""
    count = min(count, len(candidates))
    if count <= 0:
        return []
    w = np.asarray(weights, float)
    return [candidates[int(j)] for j in rng.choice(len(candidates), count, replace=False, p=w / w.sum())]


def _assign_findings(cfg: SynthConfig, n: int) -> list[dict[str, str | None]]:
    """Per study: finding kind -> None, or the kind it is anchored to (a calvarial fracture under an EDH)."""
    rng = np.random.default_rng([cfg.seed, 7919])
    chosen: list[dict[str, str | None]] = [{} for _ in range(n)]
    counts = {kind: int(round(cfg.prevalence.get(kind, 0.0) * n)) for kind in FINDINGS}
    bleeds = [k for k in sorted(BLEEDS, key=lambda k: -counts[k]) if counts[k]]  # most frequent first
    if cfg.ich_prevalence is None:  # each haemorrhage kind independently of the others
        for kind in bleeds:
            for i in _pick(rng, list(range(n)), counts[kind], [1.0] * n):
                chosen[i][kind] = None
    else:
        ich = [int(i) for i in rng.permutation(n)[: int(round(cfg.ich_prevalence * n))]]
        slots = sum(counts[k] for k in bleeds)  # subtype assignments still to make
        for kind in bleeds:
            slots -= counts[kind]
            # every ICH study ends with a subtype: force the uncovered ones the later kinds cannot all take
            uncovered = [i for i in ich if not chosen[i]]
            forced = _pick(rng, uncovered, min(len(uncovered) - slots, counts[kind]), [1.0] * len(uncovered))
            taken = set(forced)
            rest = [i for i in ich if i not in taken]
            weights = [clinical.affinity(kind, chosen[i]) * (1.0 if chosen[i] else clinical.UNCOVERED) for i in rest]
            for i in forced + _pick(rng, rest, counts[kind] - len(forced), weights):
                chosen[i][kind] = None
        for i in ich:  # rounding left too few subtype slots: the most frequent subtype takes the rest
            if not chosen[i] and bleeds:
                chosen[i][bleeds[0]] = None
    edh = [i for i in range(n) if "EDH" in chosen[i]]
    paired = [i for i in edh if rng.random() < clinical.EDH_WITH_FRACTURE][: counts["CalvarialFracture"]]
    for i in paired:
        chosen[i]["CalvarialFracture"] = "EDH"
    for kind in ("CalvarialFracture", "OtherFracture", "Tumor"):
        rest = [i for i in range(n) if kind not in chosen[i]]
        done = n - len(rest)
        for i in _pick(rng, rest, counts[kind] - done, [clinical.affinity(kind, chosen[i]) for i in rest]):
            chosen[i][kind] = None
    return chosen


def _plan_study(cfg: SynthConfig, tpl: Template, i: int, kinds: dict[str, str | None],
                birth_dates: set[str]) -> StudyPlan:
    rng = study_rng(cfg.seed, i, 1)
    subject = sample_subject(rng)
    findings: list[Finding] = []
    for kind in FINDINGS:
        if kind not in kinds:
            continue
        anchor = next((f for f in findings if f.kind == kinds[kind]), None) if kinds[kind] else None
        findings.append(sample_finding(kind, rng, tpl, anchor=anchor))
    labels, shift, moved = derive_labels(tuple(findings), subject, tpl)
    reads, flips = _reads(labels, cfg.reader_disagreement, study_rng(cfg.seed, i, 2))
    z_lo = subject.to_patient(np.array([0.0, -40.0, -60.0]))[2] + rng.uniform(-6.0, 3.0)
    z_hi = subject.to_patient(np.array([0.0, -20.0, 97.0]))[2] + rng.uniform(0.0, 6.0)
    srng = study_rng(cfg.seed, i, 3)
    study = _study_header(cfg.seed, i, subject, srng, birth_dates)
    return StudyPlan(
        index=i, name=f"SYN-CT-{i}", folder=f"SYNCT{i} SYNCT{i}", subject=subject, findings=tuple(findings),
        labels=labels, reads=reads, flips=flips, midline_shift_mm=round(shift, 2),
        displacement_mm=round(moved, 2), study=study, series=_series(cfg, i, study, srng),
        coverage_mm=(float(z_lo), float(z_hi)), table_z=float(srng.uniform(-120.0, 60.0)),
    )


def _reads(truth: dict[str, int], p: float, rng: np.random.Generator):
    """Three readers agreeing with the truth, except that per label one reader flips with probability p
    (so the majority is always the truth)."""
    reads = [dict(truth) for _ in range(3)]
    flips = []
    for label in LABELS:
        if rng.random() < p:
            reader = int(rng.integers(3))
            reads[reader][label] = 1 - reads[reader][label]
            flips.append((f"R{reader + 1}", label))
    return (reads[0], reads[1], reads[2]), tuple(flips)


def _word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES, syllables)).capitalize()


def _code(rng: np.random.Generator, letters: int, digits: int) -> str:
    return "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), letters)) + "".join(
        rng.choice(list("0123456789"), digits))


def _study_header(seed: int, i: int, subject: Subject, rng: np.random.Generator, births: set[str]) -> StudyHeader:
    """Fake identifying values (unique per study, >= 8 characters) and the acquisition context."""
    study_day = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3000)))
    birth = study_day - dt.timedelta(days=int(subject.age * 365.25 + rng.integers(0, 365)))
    while birth.strftime("%Y%m%d") in births:  # unique per study, deterministic in study order
        birth -= dt.timedelta(days=1)
    births.add(birth.strftime("%Y%m%d"))
    vendor = str(rng.choice(list(VENDORS), p=[v[0] for v in VENDORS.values()]))
    models = VENDORS[vendor][1]
    return StudyHeader(
        patient_name=f"{_word(rng, 3)}^{_word(rng, 3)}",
        patient_id=f"PX{_code(rng, 4, 6)}",
        birth_date=birth.strftime("%Y%m%d"),
        accession=f"AN{_code(rng, 3, 7)}",
        institution=f"{_word(rng, 3)} {_word(rng, 2)} Hospital",
        sex=str(rng.choice(["M", "F"])),
        age_years=subject.age,
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        study_description=str(rng.choice(["CT HEAD WITHOUT CONTRAST", "CT BRAIN PLAIN", "HEAD ROUTINE",
                                          "NCCT HEAD", "CT HEAD WO"])),
        study_uid=make_uid(seed, i, "study"),
        frame_uid=make_uid(seed, i, "frame"),
        manufacturer=vendor,
        model=str(models[int(rng.integers(len(models)))]),
        kvp=float(rng.choice([120.0, 100.0, 140.0, 110.0], p=[0.75, 0.1, 0.1, 0.05])),
    )


def _series(cfg: SynthConfig, i: int, study: StudyHeader, rng: np.random.Generator) -> tuple[SeriesPlan, ...]:
    """The main thick axial series, and for some studies a thin, a bone-kernel and/or a localizer series."""
    _, _, soft, bone, signed, intercept, padding, scout = VENDORS[study.manufacturer]
    kernel, bone_kernel = str(rng.choice(soft)), str(rng.choice(bone))
    thick = cfg.slice_thickness_mm
    noise = float(rng.uniform(3.0, 6.0))
    psf = float(rng.uniform(0.45, 0.7))
    streak = float(rng.uniform(5.0, 25.0))
    main = Reconstruction(thick, thick, psf, noise, float(rng.uniform(1.0, 1.5)), 0.0, streak)
    wanted = {"axial"}
    if rng.random() < cfg.extra_series_fraction:
        while len(wanted) == 1:
            wanted |= {k for k, p in (("thin", 0.3), ("bone", 0.5), ("localizer", 0.7)) if rng.random() < p}
    thin_mm = float(rng.choice([1.25, 1.0], p=[0.8, 0.2]))
    bone_mm = float(rng.choice([thick, 2.5]))
    options = {
        "localizer": (scout, "", ("ORIGINAL", "PRIMARY", "LOCALIZER"), None, (1500, 3000)),
        "axial": (str(rng.choice(["CT PLAIN", f"CT {thick:g}mm", f"HEAD {thick:.1f} {kernel}", "PLAIN THICK"])),
                  kernel, ("ORIGINAL", "PRIMARY", "AXIAL"), main, (40, 80)),
        "thin": (str(rng.choice(["CT PLAIN THIN", f"CT {thin_mm:g}mm", f"HEAD {thin_mm} {kernel}"])), kernel,
                 ("ORIGINAL", "PRIMARY", "AXIAL"),
                 Reconstruction(thin_mm, thin_mm, psf, noise * np.sqrt(thick / thin_mm) * rng.uniform(0.8, 1.0),
                                main.noise_grain_px, 0.0, streak * 1.3), (40, 80)),
        "bone": (str(rng.choice(["CT BONE", f"BONE {bone_mm:g}mm", f"HEAD {bone_mm:.1f} {bone_kernel}"])),
                 bone_kernel, ("ORIGINAL", "PRIMARY", "AXIAL"),
                 Reconstruction(bone_mm, bone_mm, 0.3, float(rng.uniform(15.0, 35.0)), 0.55,
                                float(rng.uniform(0.8, 1.5)), streak * 1.5), (600, 2800)),
    }
    out = []
    for number, kind in enumerate((k for k in ("localizer", "axial", "thin", "bone") if k in wanted), start=1):
        description, kern, image_type, recon, window = options[kind]
        header = SeriesHeader(
            number=number, description=description, kernel=kern, image_type=image_type,
            uid=make_uid(cfg.seed, i, "series", number), signed=signed, intercept=intercept,
            padding=padding if kind != "localizer" else None, extension=bool(rng.random() < 0.8),
            descending=bool(rng.random() < 0.25), window=window,
        )
        out.append(SeriesPlan(kind, header, recon))
    return tuple(out)
