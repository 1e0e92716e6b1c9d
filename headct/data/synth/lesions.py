"""Paint findings (see findings.py) into a rendered head, in HU, with partial volume at their edges.

Every painter works in a sub-box of the phantom around its lesion, records where it painted in `head.lesion`
(used to pick the montage's key slice) and returns the lesion's volume: the sum of its partial-volume weights
(blood, tumour core, fracture gap and its secondary signs; not the oedema rim) times the voxel volume. Lesions are placed in the skull frame `head.t`; the
brain around space-occupying lesions was already displaced when the head was rendered (phantom.mass_effect).
"""

from __future__ import annotations

import numpy as np

from headct.data.synth.anatomy import GRID_MM
from headct.data.synth.findings import HEAD_CENTRE, Finding
from headct.data.synth.phantom import Head, ramp
from headct.data.synth.template import Template

PAINT_ORDER = ("SAH", "IVH", "Tumor", "IPH", "ChronicBleed", "SDH", "EDH", "CalvarialFracture", "OtherFracture")


VOXEL_ML = GRID_MM**3 / 1000.0  # one phantom voxel (1.5 mm)^3 in mL


def paint(head: Head, finding: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """Render one finding into `head` (in place); returns its painted volume in mL."""
    painter = {
        "IPH": _mass, "Tumor": _mass, "SDH": _extra_axial, "EDH": _extra_axial, "ChronicBleed": _extra_axial,
        "IVH": _intraventricular, "SAH": _subarachnoid, "CalvarialFracture": _fracture, "OtherFracture": _fracture,
    }[finding.kind]
    return painter(head, finding, tpl, rng) * VOXEL_ML


def _local(head: Head, centre, radius: float, brain: bool = False):
    box = head.box(np.asarray(centre), radius)
    t = (head.t_brain if brain else head.t)[(slice(None), *box)]
    d = [t[k] - np.float32(centre[k]) for k in range(3)]
    return box, t, d


def _blend(head: Head, box, weight: np.ndarray, hu: float | np.ndarray) -> float:
    """Mix `hu` into the box with partial-volume `weight`; returns the weight's sum (voxels)."""
    head.hu[box] += weight * (hu - head.hu[box])
    np.maximum(head.lesion[box], weight, out=head.lesion[box])
    return float(weight.sum(dtype=np.float64))


def _shape_noise(d: list[np.ndarray], dist: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """1 + smooth random bumps over direction: an irregular (not spherical) outline."""
    unit = [c / np.maximum(dist, 1e-3) for c in d]
    bumps = np.zeros_like(dist)
    for _ in range(5):
        w = rng.normal(size=3) * rng.uniform(1.5, 3.0)
        phase = rng.uniform(0, 2 * np.pi)
        bumps += np.cos(np.float32(w[0]) * unit[0] + np.float32(w[1]) * unit[1] + np.float32(w[2]) * unit[2]
                        + np.float32(phase))
    return 1.0 + np.float32(amount / np.sqrt(2.5)) * bumps


def _mass(head: Head, f: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """Parenchymal haematoma with a hypodense oedema rim, or a tumour (oedema spreads along white matter)."""
    p = f.params
    radius, oedema = float(p["radius"]), float(p["oedema_mm"])
    box, _, d = _local(head, f.centre, radius * 1.4 + oedema + 3)
    dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    edge = radius * np.clip(_shape_noise(d, dist, float(p["irregular"]), rng), 0.5, 1.35)  # stays in the box
    margin = 3.0 if p.get("subtype") == "glioma" else GRID_MM  # gliomas are ill-defined
    intracranial = 1.0 - ramp(head.env[box] - np.float32(head.subject.csf_gap_mm))  # the skull stays
    core = ramp(edge - dist, margin) * intracranial
    tissue = head.tissue[box]
    rim = ramp(edge + np.float32(oedema) - dist, 2.5) * (1.0 - core)
    if f.kind == "Tumor":
        rim *= head.share[box] ** 2  # vasogenic oedema: finger-like, in white matter
    head.hu[box] -= rim * tissue * np.float32(p["oedema_hu"])
    np.maximum(head.lesion[box], 0.5 * rim * tissue, out=head.lesion[box])
    volume = _blend(head, box, core, np.float32(p["hu"]))
    if p.get("calcified"):  # inside the core: not counted twice
        spots = ramp(np.float32(0.35 * radius) - np.abs(dist - np.float32(0.6 * radius)), GRID_MM) * (
            _shape_noise(d, dist, 1.0, rng) > 1.6)
        _blend(head, box, spots * core, np.float32(rng.uniform(150.0, 500.0)))
    return volume


def _surface_coords(t: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates over the brain's convexity around `centre`: (a, b) tangential mm measured by direction
    from the head centre (so they follow the skull's curvature) and the radius ratio to the centre's."""
    axis = centre - HEAD_CENTRE
    radius = float(np.linalg.norm(axis))
    w0 = axis / radius
    u = np.cross(w0, [0.0, 0.0, 1.0])
    u = u / np.linalg.norm(u) if np.linalg.norm(u) > 1e-3 else np.array([1.0, 0.0, 0.0])
    v = np.cross(w0, u)
    rel = [t[k] - np.float32(HEAD_CENTRE[k]) for k in range(3)]
    r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + np.float32(1e-3)
    cos0 = sum(np.float32(w0[k]) * rel[k] for k in range(3)) / r
    scale = np.float32(radius) / np.maximum(cos0, np.float32(0.05))  # gnomonic: tangent-plane distance
    a = sum(np.float32(u[k]) * rel[k] for k in range(3)) / r * scale
    b = sum(np.float32(v[k]) * rel[k] for k in range(3)) / r * scale
    return a, b, (r / np.float32(radius)) * (cos0 > 0.2)


def _extra_axial(head: Head, f: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """SDH / chronic SDH: a crescent hugging the inner table over a wide area; EDH: a short biconvex lens.

    Both fill the space under the inner table (env = csf gap) to their local thickness, over the brain,
    and stop at the midline."""
    p, s = f.params, head.subject
    thick = float(p["thickness"])
    reach = float(p["extent"]) * (1.0 if f.kind == "EDH" else 2.2) + thick
    box, t, _ = _local(head, f.centre, reach)
    a, b, radial = _surface_coords(t, np.asarray(f.centre))
    if f.kind == "EDH":  # limited by the sutures: a sharp-ended lens
        r2 = (a * a + b * b) / np.float32(p["extent"]) ** 2
        profile = np.clip(1.0 - r2, 0.0, 1.0) ** 0.6
    else:
        profile = np.exp(-0.5 * ((a / np.float32(p["extent"])) ** 2 + (b / np.float32(p["extent2"])) ** 2))
    depth = np.float32(thick) * profile
    inner = np.float32(s.csf_gap_mm)
    env = head.env[box]
    sign = -1.0 if f.side == "L" else 1.0
    weight = (ramp(env - (inner - depth)) * (1.0 - ramp(env - inner)) * (depth > 0.2) * (radial > 0.6)
              * ramp(np.float32(sign) * t[0] - 1.0))  # never across the falx
    hu = np.float32(p["hu"]) + np.float32(rng.uniform(-4, 4)) * np.cos(a / 9.0) * np.sin(b / 7.0)
    return _blend(head, box, weight, hu)


def _intraventricular(head: Head, f: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """Blood layering dependently in the ventricles: posterior (occipital horns) in a supine patient."""
    p = f.params
    box, t, _ = _local(head, (0.0, -20.0, 8.0), 60.0, brain=True)
    vent = head.ventricle[box]
    if f.side != "both":
        vent = vent * ramp(np.float32(-1.0 if f.side == "L" else 1.0) * t[0] - 1.0)
    y = head.grid.axis(1)[box[1]][None, :, None]  # patient y (mm): gravity points to -y (posterior)
    # The most dependent ventricular point; slit-like ventricles (a young brain) never reach a fraction of 0.5.
    peak = float(vent.max())
    y_vent = np.broadcast_to(y, vent.shape)[vent >= 0.5 * peak] if peak > 0.05 else np.zeros(0)
    if y_vent.size == 0:
        return 0.0
    level = np.float32(y_vent.min() + float(p["depth"]))
    blood = vent * ramp(level - y, GRID_MM)
    return _blend(head, box, blood, np.float32(p["hu"]))


def _subarachnoid(head: Head, f: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """Blood in the sulci and cisterns: hyperdense CSF spaces within a blob-shaped region."""
    p = f.params
    spread = float(p["spread"])
    if p["pattern"] == "basal":
        centres = [(0.0, 2.0, -14.0), (-14.0, -22.0, -8.0), (14.0, -22.0, -8.0), (0.0, -18.0, -30.0)]
        scales = [(1.0, 1.0, 0.7)] * 4
    elif p["pattern"] == "sylvian":
        centres, scales = [f.centre], [(0.6, 1.6, 0.9)]
    else:
        centres, scales = [f.centre], [(1.0, 1.0, 1.0)]
    volume = 0.0
    for centre, scale in zip(centres, scales, strict=True):
        box, t, d = _local(head, centre, spread * 2.5 * max(scale), brain=True)
        g = np.exp(-0.5 * sum((d[k] / np.float32(spread * scale[k])) ** 2 for k in range(3)))
        if f.side != "both":
            g *= ramp(np.float32(-1.0 if f.side == "L" else 1.0) * t[0] - 1.0)
        # Sulci are thinner than a voxel: a voxel with some CSF in it can be mostly blood.
        csf = np.sqrt((1.0 - head.tissue[box]) * (1.0 - head.ventricle[box])) * (
            head.env[box] < head.subject.csf_gap_mm)
        volume += _blend(head, box, np.clip(1.6 * np.float32(p["fill"]) * g, 0.0, 1.0) * csf, np.float32(p["hu"]))
    return volume


def _gap_fraction(across: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel (1.5 mm) covered by a gap of `width` mm centred `across` mm away."""
    half = np.float32(GRID_MM / 2)
    lo = np.maximum(across - np.float32(width / 2), -half)
    hi = np.minimum(across + np.float32(width / 2), half)
    return np.clip(hi - lo, 0.0, None) / np.float32(GRID_MM)


def _fracture(head: Head, f: Finding, tpl: Template, rng: np.random.Generator) -> float:
    """A thin lucent line through bone (calvarium or skull base), with a scalp haematoma or fluid in the
    sinuses / mastoid as secondary signs."""
    p = f.params
    length = float(p["length"])
    box, t, d = _local(head, f.centre, length / 2 + 4)
    along = sum(np.float32(p[k]) * d[i] for i, k in enumerate(("dx", "dy", "dz")))
    across = sum(np.float32(p[k]) * d[i] for i, k in enumerate(("px", "py", "pz")))
    fade = np.clip((np.float32(length / 2) - np.abs(along)) / 3.0, 0.0, 1.0)
    if f.kind == "OtherFracture":
        fade *= np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) < np.float32(length / 2)
    gap = _gap_fraction(across, float(p["width"])) * fade * head.bone[box]
    volume = _blend(head, box, gap, np.float32(40.0))
    if p.get("scalp_haematoma"):
        volume += _scalp_haematoma(head, f, rng)
    if p.get("fluid"):
        volume += _sinus_fluid(head, f)
    return volume


def _scalp_haematoma(head: Head, f: Finding, rng: np.random.Generator) -> float:
    s = head.subject
    skull_out = s.csf_gap_mm + s.inner_mm + s.diploe_mm + s.outer_mm
    scalp = s.galea_mm + s.fat_mm + s.skin_mm
    height, radius = rng.uniform(3.0, 10.0), rng.uniform(18.0, 35.0)
    box, t, d = _local(head, f.centre, radius + height + 25)
    n = np.array([f.centre[k] - (0.0, -18.0, 10.0)[k] for k in range(3)])
    n /= np.linalg.norm(n)
    normal = sum(np.float32(n[k]) * d[k] for k in range(3))
    r2 = sum(d[k] ** 2 for k in range(3)) - normal**2
    bulge = np.float32(height) * np.clip(1.0 - r2 / np.float32(radius**2), 0.0, 1.0)
    env = head.env[box]
    w = ramp(env - np.float32(skull_out + 0.5)) * (1.0 - ramp(env - np.float32(skull_out + scalp) - bulge))
    return _blend(head, box, w * np.clip(bulge / 1.5, 0.0, 1.0), np.float32(rng.uniform(45.0, 70.0)))


def _sinus_fluid(head: Head, f: Finding) -> float:
    """Blood in the sphenoid sinus (dependent layer) or opacified mastoid cells next to a base fracture."""
    sign = -1.0 if f.side == "L" else 1.0
    mastoid = f.params.get("site") in ("petrous", "occipital")
    centre = (sign * 49.0, -38.0, -49.0) if mastoid else (0.0, 12.0, -40.0)
    box, t, d = _local(head, centre, 18.0)
    inside = sum((d[k] / np.float32(s)) ** 2 for k, s in enumerate((12.0, 13.0, 15.0) if mastoid
                                                                    else (16.0, 13.0, 11.0))) < 1.0
    air = np.clip((-200.0 - head.hu[box]) / 600.0, 0.0, 1.0) * inside
    if not mastoid:  # a fluid level: the posterior (dependent) part of the sinus fills
        y = head.grid.axis(1)[box[1]][None, :, None]
        y_air = np.broadcast_to(y, air.shape)[air > 0.5]
        if y_air.size:
            air = air * ramp(np.float32(y_air.min() + 6.0) - y, GRID_MM)
    return _blend(head, box, air * np.float32(0.9), np.float32(35.0))
