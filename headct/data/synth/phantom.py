"""Render a subject's head phantom in HU: warp the template into the patient frame, age it, add skull,
scalp, falx, physiological calcifications and the skull base; displace the brain around masses.

The phantom is (nx, ny, nz) float32 HU on a 1.5 mm grid in the patient RAS frame (array axes x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headct.data.synth.anatomy import FOV_CENTRE_Y, GRID_MM, Grid, Subject
from headct.data.synth.template import TEMPLATE_ORIGIN, Template, sample

# Deep midline points (template mm) where midline shift is measured: septum pellucidum / third ventricle level.
MIDLINE_POINTS = np.array([[0.0, y, z] for y in (-25.0, -12.0, 0.0, 12.0, 22.0) for z in (0.0, 10.0, 20.0)])


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Head:
    """The rendered phantom and the per-voxel fields the lesion painters need. Arrays are (nx, ny, nz)."""

    grid: Grid
    subject: Subject
    hu: np.ndarray  # float32 HU
    t: np.ndarray  # (3, nx, ny, nz) template mm of each voxel (skull frame, not displaced by mass effect)
    t_brain: np.ndarray  # (3, nx, ny, nz) template mm of the brain tissue seen at each voxel (displaced)
    env: np.ndarray  # signed distance to the brain envelope (template mm, > 0 outside)
    tissue: np.ndarray  # parenchyma fraction after atrophy (0..1)
    share: np.ndarray  # white-matter share of the parenchyma
    ventricle: np.ndarray  # ventricular CSF fraction (0..1)
    bone: np.ndarray  # calvarial + skull-base bone fraction (0..1)
    lesion: np.ndarray  # 0..1 where a finding was painted (for the montage's key slice)

    def box(self, centre_t: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
        """Index box of the voxels within `radius_mm` (template mm) of a template point."""
        s = self.subject
        c = s.to_patient(np.asarray(centre_t, float))
        r = radius_mm * max(s.scale) + 8.0  # + warp and rotation slack
        lo = np.floor((c - r - self.grid.origin) / self.grid.spacing).astype(int)
        hi = np.ceil((c + r - self.grid.origin) / self.grid.spacing).astype(int) + 1
        shape = self.grid.shape
        return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, shape, strict=True))  # type: ignore


def ramp(x: np.ndarray, width: float = GRID_MM) -> np.ndarray:
    """Partial-volume step: 0 for x << 0, 1 for x >> 0, linear over one voxel."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def template_coords(subject: Subject, grid: Grid) -> np.ndarray:
    """(3, nx, ny, nz) float32 template mm of each patient voxel: inverse pose plus the smooth warp.

    Both parts are separable sums over per-axis basis functions [1, s, cos(pi s'), cos(2 pi s'), cos(3 pi s')]
    (s in mm from the head centre, s' in 0..1 across the grid), so each component is three small tensordots.
    """
    inv = np.linalg.inv(subject.linear())
    centre = np.array(subject.translation_mm) + np.array([0.0, FOV_CENTRE_Y, 0.0])
    basis = []
    for k in range(3):
        a = grid.axis(k).astype(np.float64) - centre[k]
        unit = (a - a[0]) / max(a[-1] - a[0], 1.0)
        basis.append(np.stack([np.ones_like(a), a, *[np.cos(np.pi * f * unit) for f in (1, 2, 3)]]))
    out = np.empty((3, *grid.shape), np.float32)
    for k in range(3):
        coef = np.zeros((5, 5, 5))
        coef[2:, 2:, 2:] = subject.warp_mm[k]
        coef[1, 0, 0], coef[0, 1, 0], coef[0, 0, 1] = inv[k]
        part = np.tensordot(basis[0].T, coef, (1, 0))  # (nx, 5, 5)
        part = np.tensordot(part, basis[1], (1, 0))  # (nx, 5, ny)
        out[k] = np.tensordot(part, basis[2], (1, 0))  # (nx, ny, nz)
    return out


def mass_effect(t: np.ndarray, env: np.ndarray, sources: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Template displacement (3, ...) of brain tissue at template points t (3, ...): a sum of Gaussian pushes,
    damped to 0 at the inner skull.

    sources: (centre t mm, vector mm, sigma mm). The brain is anchored to the dura, so the push fades within
    15 mm of the envelope; deep structures (ventricles, septum, falx edge) move the most.
    """
    u = np.zeros_like(t)
    damp = np.clip(-env / 15.0, 0.0, 1.0)
    for centre, vector, sigma in sources:
        d2 = sum((t[k] - np.float32(centre[k])) ** 2 for k in range(3))
        w = np.exp(d2 * np.float32(-0.5 / sigma**2)) * damp
        for k in range(3):
            u[k] += np.float32(vector[k]) * w
    return u


def displacement_at(points: np.ndarray, sources: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Undamped displacement (N, 3) at deep template points: what the plan uses to label mass effect."""
    u = np.zeros((len(points), 3))
    for centre, vector, sigma in sources:
        w = np.exp(-0.5 * ((points - centre) ** 2).sum(1) / sigma**2)
        u += w[:, None] * np.asarray(vector)[None]
    return u


def render_head(tpl: Template, subject: Subject, grid: Grid,
                sources: tuple[tuple[np.ndarray, np.ndarray, float], ...] = ()) -> Head:
    """Normal anatomy in HU (plus mass-effect displacement of the brain when `sources` are given)."""
    s = subject
    t = template_coords(s, grid)
    env = _smooth_sample(tpl.coarse[:1], t)
    # Brain channels are only sampled inside the envelope (about a fifth of the box): the rest is skull or air.
    inside = env < 1.5
    pts = t[:, inside]
    t_brain = t  # the brain sits where the skull frame says, unless a mass pushes it
    if sources:
        pts = pts - mass_effect(pts, env[inside], list(sources))
        t_brain = t.copy()
        t_brain[:, inside] = pts
    tissue_in, share_in, vd_in = sample(tpl.brain, TEMPLATE_ORIGIN, 1.0, pts)
    # Atrophy: a raised threshold on the partial-volume tissue fraction widens sulci; ventricles grow outward.
    tissue_in = np.clip((tissue_in - s.sulcal_atrophy) / (1.0 - s.sulcal_atrophy), 0.0, 1.0)
    vent_in = ramp(s.ventricle_mm - vd_in, 1.0)
    tissue_in *= (1.0 - vent_in) * (1.0 - ramp(env[inside], 1.0))
    tissue = np.zeros(grid.shape, np.float32)
    share = np.full(grid.shape, 0.5, np.float32)
    ventricle = np.zeros(grid.shape, np.float32)
    tissue[inside], share[inside], ventricle[inside] = tissue_in, share_in, vent_in
    hu = np.full(grid.shape, np.float32(s.hu_csf), np.float32)
    hu[inside] = tissue_in * (share_in * np.float32(s.hu_white) + (1.0 - share_in) * np.float32(s.hu_grey)) + (
        1.0 - tissue_in) * np.float32(s.hu_csf)
    # Skull and scalp only where they can be: a shell of the envelope distance (the rest is brain/CSF or air).
    shell = (env > np.float32(s.csf_gap_mm - 6.0)) & (env < np.float32(s.scalp_extent_mm + 1.0))
    hu[env >= np.float32(s.scalp_extent_mm + 1.0)] = -1000.0
    bone = np.zeros(grid.shape, np.float32)
    hu[shell], bone[shell] = _skull_and_scalp(s, env[shell], t[:, shell], hu[shell])
    head = Head(grid=grid, subject=s, hu=hu, t=t, t_brain=t_brain, env=env, tissue=tissue, share=share,
                ventricle=ventricle, bone=bone, lesion=np.zeros(grid.shape, np.float32))
    _paint_falx(head)
    _paint_calcifications(head, tpl)
    _paint_skull_base(head, tpl)
    return head


def _skull_and_scalp(s: Subject, env: np.ndarray, t: np.ndarray, inner_hu: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """HU and bone fraction of voxels (1D arrays) from their envelope distance: CSF gap, inner table, diploe,
    outer table, galea (+ temporalis), fat, skin, air, each edge partial-volumed over one voxel."""
    temporal = _temporal_weight(t)
    diploe = np.float32(s.diploe_mm) * (1.0 - 0.8 * temporal)  # thin temporal squama
    muscle = np.float32(s.galea_mm) + 5.0 * temporal  # temporalis muscle over the temporal squama
    inner_edge = np.float32(s.csf_gap_mm)
    o_inner = ramp(env - inner_edge)
    o_dip = ramp(env - inner_edge - np.float32(s.inner_mm))
    skull_out = env - inner_edge - np.float32(s.inner_mm) - diploe
    o_out = ramp(skull_out)
    skull_out -= np.float32(s.outer_mm)
    o_skull = ramp(skull_out)
    o_fat = ramp(skull_out - muscle)
    o_skin = ramp(skull_out - muscle - np.float32(s.fat_mm))
    o_air = ramp(skull_out - muscle - np.float32(s.fat_mm + s.skin_mm))
    # Beam hardening makes the brain just under the inner table look a few HU denser (a subdural look-alike).
    inner_hu = inner_hu + np.float32(s.rim_hu) * np.exp(np.minimum(env - inner_edge, 0.0) / 2.0)
    cortical, dip = np.float32(s.hu_cortical), np.float32(s.hu_diploe)
    soft, fat = np.float32(s.hu_soft), np.float32(s.hu_fat)
    hu = (inner_hu * (1.0 - o_inner) + cortical * (o_inner - o_dip) + dip * (o_dip - o_out)
          + cortical * (o_out - o_skull) + soft * (o_skull - o_fat) + fat * (o_fat - o_skin)
          + soft * (o_skin - o_air)
          - 1000.0 * o_air)
    return hu, o_inner - o_skull


def _smooth_sample(volume: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sample a smooth 2 mm channel on every other voxel, then upsample trilinearly (8x fewer lookups)."""
    import torch
    import torch.nn.functional as F

    coarse = t[:, ::2, ::2, ::2]
    shape = t.shape[1:]
    sampled = sample(volume, TEMPLATE_ORIGIN, 2.0, coarse)  # (1, cx, cy, cz)
    # Upsample so that coarse voxel i lands on fine voxel 2i; the odd tail (if any) is extrapolated by clamping.
    full = F.interpolate(torch.from_numpy(sampled)[None], size=tuple(2 * (n - 1) + 1 for n in sampled.shape[1:]),
                         mode="trilinear", align_corners=True)[0, 0].numpy()
    out = np.empty(shape, np.float32)
    out[: full.shape[0], : full.shape[1], : full.shape[2]] = full[: shape[0], : shape[1], : shape[2]]
    for axis in range(3):  # even-sized axes miss their last voxel: repeat the one before
        if full.shape[axis] < shape[axis]:
            idx = [slice(None)] * 3
            idx[axis] = slice(full.shape[axis], None)
            src = [slice(None)] * 3
            src[axis] = slice(full.shape[axis] - 1, full.shape[axis])
            out[tuple(idx)] = out[tuple(src)]
    return out


def _temporal_weight(t: np.ndarray) -> np.ndarray:
    """0..1, high over the temporal squama (lateral, below the sylvian level): thin bone, thick muscle."""
    dx = np.abs(t[0]) / np.float32(70.0)
    lateral = np.clip((dx - 0.75) / 0.2, 0.0, 1.0)
    low = np.clip((np.float32(35.0) - t[2]) / 20.0, 0.0, 1.0)
    front = np.clip((t[1] + 45.0) / 20.0, 0.0, 1.0) * np.clip((45.0 - t[1]) / 20.0, 0.0, 1.0)
    return (lateral * low * front).astype(np.float32)


def _slab(mask_along_axis: np.ndarray) -> slice:
    idx = np.nonzero(mask_along_axis)[0]
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _paint_falx(head: Head) -> None:
    """Falx cerebri: a ~1 mm dural sheet in the interhemispheric CSF, anchored to the skull above the callosum."""
    s = head.subject
    xs = _slab((head.t_brain[0].min(axis=(1, 2)) < 3.0) & (head.t_brain[0].max(axis=(1, 2)) > -3.0))
    x = head.t_brain[0, xs]
    env = head.env[xs]
    sheet = np.clip(1.0 - (np.abs(x) - 0.5) / GRID_MM, 0.0, 1.0) * np.float32(0.8)
    inside = (env < s.csf_gap_mm) & (env > -38.0) & (head.t_brain[2, xs] > -15.0)
    w = sheet * inside * (1.0 - head.tissue[xs]) * (1.0 - head.ventricle[xs])
    head.hu[xs] += w * (np.float32(s.hu_falx) - head.hu[xs])


def _paint_calcifications(head: Head, tpl: Template) -> None:
    """Physiological calcifications (> 100 HU): pineal, choroid plexus, pallidum, falx plaques."""
    for site, centre, radius, hu in head.subject.calcifications:
        c = tpl.ventricle_points.get(site, np.array(centre))
        box = head.box(c, radius + 2)
        tb = head.t_brain[(slice(None), *box)]
        dist = np.sqrt(sum((tb[k] - np.float32(c[k])) ** 2 for k in range(3)))
        w = ramp(np.float32(radius) - dist)
        head.hu[box] += w * (np.float32(hu) - head.hu[box])


def _paint_skull_base(head: Head, tpl: Template) -> None:
    """Blend in the static skull base and face (petrous bones, sinuses, orbits) below the brain."""
    zs = (slice(None), slice(None), _slab(head.t[2].min(axis=(0, 1)) < 14.0))
    t, env = head.t[(slice(None), *zs)], head.env[zs]
    where = (t[2] < 14.0) & (env > 0.5) & ((env < 16.0) | (t[2] < -20.0))
    if not where.any():
        return
    hu_b, w = sample(tpl.base, tpl.base_origin, tpl.base_spacing, t[:, where])
    s = head.subject
    hu_b = np.where(hu_b > 300.0, hu_b * np.float32(s.hu_cortical / 1500.0), hu_b)
    w *= ramp(env[where] - np.float32(s.csf_gap_mm), 1.0)  # never over the brain or its CSF
    hu, bone = head.hu[zs], head.bone[zs]
    hu[where] += w * (hu_b - hu[where])
    bone[where] = bone[where] * (1.0 - w) + w * np.clip((hu_b - 150.0) / 900.0, 0.0, 1.0)
