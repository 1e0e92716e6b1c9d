"""Findings of a synthetic study: what, where, how big, and the labels they imply.

A `Finding` is plain data in template (MNI) mm, drawn from a per-study generator; `lesions.paint` renders it.
Labels follow the canonical vocabulary: bleeds imply ICH and a BleedLocation side; the two fracture kinds
imply Fracture; MassEffect and MidlineShift are measured on the mass-effect displacement field (midline shift
in patient mm at the septum/third-ventricle level, >= 5 mm is significant). Bleeds and tumours are sized
by volume in mL (clinical.py); the painted volume is measured and reported in truth.csv.
Side "L" is the patient's left, which is template x < 0 (RAS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from headct.config.base import LABELS
from headct.data.synth import clinical
from headct.data.synth.anatomy import Subject
from headct.data.synth.phantom import MIDLINE_POINTS, displacement_at
from headct.data.synth.template import Template, lookup, surface_point
from headct.data.synth.truth import BLEEDS, FINDINGS

SPACE_OCCUPYING = ("IPH", "SDH", "EDH", "ChronicBleed", "Tumor")
MASS_EFFECT_MM = 3.0  # brain displaced at least this much (deep structures)
MIDLINE_SHIFT_MM = 5.0  # "significant" midline shift
HEAD_CENTRE = np.array([0.0, -18.0, 10.0])

Push = tuple[np.ndarray, np.ndarray, float]  # (centre mm, vector mm, sigma mm) of a mass-effect source


@dataclass(frozen=True)
class Finding:
    """One lesion. `centre` is template mm; `params` holds kind-specific sizes (mm) and densities (HU)."""

    kind: str
    side: str  # "L", "R" or "both"
    centre: tuple[float, float, float]
    params: dict[str, float | str] = field(default_factory=dict)
    push: Push | None = None


def _side_sign(side: str) -> float:
    return -1.0 if side == "L" else 1.0


def _brain_point(tpl: Template, rng: np.random.Generator, side: str, radius: float, region: str) -> np.ndarray:
    """A parenchymal point at least `radius` mm deep in the brain and away from the ventricles."""
    sign = _side_sign(side)
    boxes = {  # template mm boxes per region, x given for the right side
        "deep": ((14, -28, -4), (30, 8, 16)),
        "lobar": ((10, -95, -15), (62, 60, 70)),
        "cerebellar": ((8, -80, -45), (40, -50, -22)),
    }
    lo, hi = (np.array(b, float) for b in boxes[region])
    for _ in range(20):
        pts = rng.uniform(lo, hi, (64, 3))
        pts[:, 0] *= sign
        v = lookup(tpl, pts)
        ok = (v["tissue"] > 0.6) & (v["env"] < -(0.6 * radius + 4.0)) & (v["vent"] > 0.5 * radius + 3.0)
        if ok.any():
            return pts[int(np.argmax(ok))]
    return np.array([sign * 24.0, -10.0, 8.0])  # basal ganglia: always deep brain


def _convexity(tpl: Template, rng: np.random.Generator, side: str, temporal_bias: float = 0.0):
    """A point on the brain surface over one hemisphere and its outward normal."""
    sign = _side_sign(side)
    azimuth = rng.uniform(0.15, 0.85) * np.pi if rng.random() > temporal_bias else rng.uniform(0.4, 0.6) * np.pi
    elevation = rng.uniform(-0.15, 0.75) if rng.random() > temporal_bias else rng.uniform(-0.25, 0.05)
    direction = np.array([sign * np.sin(azimuth) * np.cos(elevation), np.cos(azimuth) * np.cos(elevation),
                          np.sin(elevation)])
    return surface_point(tpl, direction, HEAD_CENTRE)


def _push_for(centre: np.ndarray, towards: np.ndarray, sigma: float, target_shift: float) -> Push:
    """Mass-effect source whose midline displacement (template mm, x) is about `target_shift`."""
    unit = towards / np.linalg.norm(towards)
    reach = displacement_at(MIDLINE_POINTS, [(centre, unit, sigma)])[:, 0]
    gain = max(float(np.abs(reach).max()), 0.15)
    magnitude = min(target_shift / gain, 0.7 * sigma)  # beyond ~0.7 sigma the warp would fold
    return centre, unit * magnitude, sigma


# Painted volume / nominal volume of each shape (measured over rendered subjects: the template -> patient warp,
# partial volume at the edges, the skull cutting into convexity and dural lesions); dividing the wanted volume by
# it makes the painted volume about the sampled one. IVH and SAH fill the CSF spaces, so their size parameter is
# fitted to the painted volume instead: volume_ml = c * size_mm ** b (fill 0.8 for SAH; per ventricle for IVH).
VOLUME_CALIBRATION = {"IPH": 0.97, "Tumor": 0.8, "EDH": 0.6, "SDH": 0.49, "ChronicBleed": 0.4}
IVH_FIT = (0.0089, 2.11)  # depth of the blood level above the most dependent ventricle point (mm)
SAH_FIT = {"basal": (0.0128, 2.94), "sylvian": (0.0072, 2.68), "convexity": (0.0199, 2.23)}  # spread (mm)


def _nominal_mm3(kind: str, volume_ml: float) -> float:
    return 1000.0 * volume_ml / VOLUME_CALIBRATION[kind]


def sample_finding(kind: str, rng: np.random.Generator, tpl: Template, volume_ml: float | None = None,
                   side: str | None = None, anchor: Finding | None = None) -> Finding:
    """Draw one finding of `kind`. Bleeds and tumours are sized from `volume_ml` (mL; drawn from the clinical
    distribution when None, headct/data/synth/clinical.py), which also sets the mass effect a space-occupying
    lesion exerts; a calvarial fracture may be `anchor`ed under an EDH (the usual pairing)."""
    side = side or ("L" if rng.random() < 0.5 else "R")
    sign = _side_sign(side)
    if volume_ml is None and kind in clinical.VOLUME_ML:
        volume_ml = clinical.sample_volume_ml(kind, rng)
    size = {"volume_ml": float(volume_ml)} if volume_ml is not None else {}
    target = clinical.shift_target_mm(kind, float(volume_ml), rng) if kind in SPACE_OCCUPYING else 0.0
    if kind in ("IPH", "Tumor"):
        radius = float((3.0 * _nominal_mm3(kind, float(volume_ml)) / (4.0 * np.pi)) ** (1.0 / 3.0))
        if kind == "IPH":
            region = rng.choice(["deep", "lobar", "lobar", "cerebellar"], p=[0.4, 0.25, 0.25, 0.1])
            if radius > 15.0:  # large haematomas are supratentorial
                region = "deep" if rng.random() < 0.5 else "lobar"
            params = {"radius": radius, "hu": rng.uniform(55.0, 85.0), "oedema_mm": rng.uniform(1.5, 3.0)
                      + 0.3 * radius, "oedema_hu": rng.uniform(6.0, 12.0), "irregular": rng.uniform(0.25, 0.5)}
        else:
            subtype = rng.choice(["glioma", "metastasis", "meningioma"])
            region = "lobar"
            hu = {"glioma": rng.uniform(24, 34), "metastasis": rng.uniform(36, 50),
                  "meningioma": rng.uniform(46, 62)}[subtype]
            spread = {"glioma": 1.0, "metastasis": 1.6, "meningioma": 0.5}[subtype]
            oedema = spread * radius * rng.uniform(0.6, 1.2)
            params = {"radius": radius, "hu": hu, "subtype": subtype, "oedema_mm": oedema,
                      "oedema_hu": rng.uniform(8.0, 14.0), "irregular": rng.uniform(0.05, 0.3),
                      "calcified": float(subtype == "meningioma" and rng.random() < 0.4)}
        if params.get("subtype") == "meningioma":
            point, normal = _convexity(tpl, rng, side)
            centre = point - normal * (0.6 * radius)  # dural based: half embedded under the inner table
        else:
            centre = _brain_point(tpl, rng, side, radius, str(region))
        towards = np.array([-sign, 0.0, 0.0]) + 0.3 * (HEAD_CENTRE - centre) / np.linalg.norm(HEAD_CENTRE - centre)
        push = _push_for(centre, towards, radius + 28.0, target)
        return Finding(kind, side, tuple(centre), params | size, push)
    if kind in ("SDH", "EDH", "ChronicBleed"):
        point, normal = _convexity(tpl, rng, side, temporal_bias=0.6 if kind == "EDH" else 0.0)
        nominal = _nominal_mm3(kind, float(volume_ml))
        if kind == "EDH":  # a lens: volume = pi * extent^2 * thickness / 1.6 for the painter's (1 - r^2)^0.6
            extent = float((4.0 * nominal / np.pi) ** (1.0 / 3.0) * rng.uniform(0.85, 1.15))
            params = {"thickness": 1.6 * nominal / (np.pi * extent**2), "extent": extent,
                      "hu": rng.uniform(55.0, 85.0)}
        else:  # a Gaussian crescent: volume = 2 pi * extent * extent2 * thickness; small ones cover less area
            scale = float(np.clip((volume_ml / 50.0) ** (1.0 / 3.0), 0.4, 1.0))
            extent, extent2 = rng.uniform(35.0, 60.0) * scale, rng.uniform(25.0, 45.0) * scale
            hu = rng.uniform(50.0, 80.0) if kind == "SDH" else rng.uniform(0.0, 25.0)
            params = {"thickness": nominal / (2.0 * np.pi * extent * extent2), "extent": extent,
                      "extent2": extent2, "hu": hu}
        source = point - normal * (params["thickness"] + 18.0)
        push = _push_for(source, -normal + np.array([-sign * 0.6, 0, 0]), 50.0, target)
        params.update({"nx": normal[0], "ny": normal[1], "nz": normal[2]})
        return Finding(kind, side, tuple(point), params | size, push)
    if kind == "IVH":
        bilateral = rng.random() < 0.4
        c, b = IVH_FIT
        depth = float(np.clip((volume_ml / (2.0 if bilateral else 1.0) / c) ** (1.0 / b), 0.5, 40.0))
        return Finding(kind, "both" if bilateral else side, (sign * 20.0, -40.0, 10.0),
                       {"depth": depth, "hu": rng.uniform(48, 75)} | size)
    if kind == "SAH":
        pattern = str(rng.choice(["basal", "sylvian", "convexity"], p=[0.35, 0.3, 0.35]))
        fill = rng.uniform(0.55, 1.0)
        c, b = SAH_FIT[pattern]
        spread = float(np.clip((volume_ml * 0.8 / fill / c) ** (1.0 / b), 2.0, 30.0))
        if pattern == "basal":
            centre = np.array([0.0, -5.0, -15.0])
            side = "both"
        elif pattern == "sylvian":
            centre = np.array([sign * 38.0, 6.0, -8.0])
        else:
            point, normal = _convexity(tpl, rng, side)
            centre = point - 6.0 * normal
        return Finding(kind, side, tuple(centre), {"pattern": pattern, "spread": spread,
                                                   "hu": rng.uniform(55, 80), "fill": fill} | size)
    if kind == "CalvarialFracture":
        if anchor is not None:
            point, normal = np.array(anchor.centre), np.array([anchor.params[k] for k in ("nx", "ny", "nz")])
            side = anchor.side
        else:
            point, normal = _convexity(tpl, rng, side)
        return Finding(kind, side, tuple(point), _fracture_params(rng, normal, rng.uniform(15.0, 70.0))
                       | {"scalp_haematoma": float(rng.random() < 0.6)})
    if kind == "OtherFracture":
        sites = {"petrous": (sign * 40.0, -30.0, -40.0), "orbit": (sign * 24.0, 50.0, -34.0),
                 "sphenoid": (sign * 8.0, 14.0, -32.0), "occipital": (sign * 20.0, -60.0, -45.0),
                 "frontal_sinus": (sign * 8.0, 80.0, -6.0)}
        site = str(rng.choice(list(sites)))
        normal = rng.normal(size=3)
        return Finding(kind, side, sites[site], _fracture_params(rng, normal, rng.uniform(12.0, 35.0))
                       | {"site": site, "fluid": float(rng.random() < 0.5)})
    raise ValueError(f"unknown finding kind {kind!r}; known: {', '.join(FINDINGS)}")


def _fracture_params(rng: np.random.Generator, normal: np.ndarray, length: float) -> dict[str, float]:
    """A fracture plane containing the bone normal: the line runs along `direction`, the gap is `width` mm."""
    normal = normal / np.linalg.norm(normal)
    helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    angle = rng.uniform(0, np.pi)
    direction = np.cos(angle) * u + np.sin(angle) * v  # along the fracture line, tangent to the skull
    plane = np.cross(normal, direction)
    return {"length": length, "width": rng.uniform(0.6, 2.0), "dx": direction[0], "dy": direction[1],
            "dz": direction[2], "px": plane[0], "py": plane[1], "pz": plane[2]}


def derive_labels(findings: tuple[Finding, ...], subject: Subject, tpl: Template
                  ) -> tuple[dict[str, int], float, float]:
    """(labels for every canonical label, midline shift mm, largest deep displacement mm) of a study."""
    kinds = {f.kind for f in findings}
    labels = {label: int(label in kinds) for label in LABELS}
    bleeds = [f for f in findings if f.kind in BLEEDS]
    labels["ICH"] = int(bool(bleeds))
    labels["BleedLocation-Left"] = int(any(f.side in ("L", "both") for f in bleeds))
    labels["BleedLocation-Right"] = int(any(f.side in ("R", "both") for f in bleeds))
    labels["Fracture"] = int(bool(kinds & {"CalvarialFracture", "OtherFracture"}))
    shift_mm, moved_mm = measure_mass_effect(findings, subject, tpl)
    labels["MidlineShift"] = int(shift_mm >= MIDLINE_SHIFT_MM)
    labels["MassEffect"] = int(moved_mm >= MASS_EFFECT_MM or labels["MidlineShift"])
    return labels, shift_mm, moved_mm


def measure_mass_effect(findings: tuple[Finding, ...], subject: Subject, tpl: Template) -> tuple[float, float]:
    """Midline shift (patient mm, lateral) and the largest displacement of deep brain (patient mm)."""
    pushes = [f.push for f in findings if f.push is not None]
    if not pushes:
        return 0.0, 0.0
    linear = subject.linear()
    midline = displacement_at(MIDLINE_POINTS, pushes) @ linear.T
    deep = displacement_at(tpl.deep_points, pushes) @ linear.T
    return float(np.abs(midline[:, 0]).max()), float(np.linalg.norm(deep, axis=1).max())
