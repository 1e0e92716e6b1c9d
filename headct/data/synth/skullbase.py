"""The static skull base and face in MNI space (the template is a skull-stripped brain, so these are modelled).

Built once per process on a 1.5 mm template-space grid from simple solids with soft (partial-volume) edges:
petrous bones with the inner-ear and external ear canals, mastoid and ethmoid air cells, clivus, sphenoid,
maxillary and frontal sinuses, nasal cavity, orbits (fat, globe, lens, optic nerve, recti, bony walls), and
the face and neck outline. The result is a canonical HU map plus a blend weight; each subject warps it with
the rest of the head and scales its bone density (anatomy._paint_skull_base). Positions are approximate
MNI152 landmarks in mm; every solid is evaluated only inside its own bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

SPACING = 1.5
ORIGIN = np.array([-96.0, -135.0, -100.0])
SHAPE = (129, 167, 77)  # up to z = +14 mm, so the frontal sinus fits

AIR, FAT, SOFT, VITREOUS, LENS = -1000.0, -90.0, 42.0, 10.0, 100.0
BONE, DENSE, CANCELLOUS = 1300.0, 1800.0, 650.0

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Base:
    hu: np.ndarray  # (X, Y, Z) float32 canonical HU
    weight: np.ndarray  # (X, Y, Z) float32 0..1: how much the base overrides the vault model
    origin: np.ndarray
    spacing: float


def _ramp(d: np.ndarray, width: float = SPACING) -> np.ndarray:
    """Inside-fraction of a signed distance d (mm, < 0 inside)."""
    return np.clip(0.5 - d / width, 0.0, 1.0).astype(np.float32)


class _Canvas:
    """HU canvas with signed-distance solids; each solid returns (box, distance inside that box)."""

    def __init__(self, env: np.ndarray) -> None:
        self.axes = [(ORIGIN[k] + np.arange(SHAPE[k]) * SPACING).astype(np.float32) for k in range(3)]
        self.env = env
        self.hu = np.full(SHAPE, AIR, np.float32)
        self.weight = np.zeros(SHAPE, np.float32)

    def _box(self, lo, hi) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray]:
        sl = tuple(slice(max(0, int((a - o) / SPACING) - 1), min(n, int((b - o) / SPACING) + 2))
                   for a, b, o, n in zip(lo, hi, ORIGIN, SHAPE, strict=True))
        x, y, z = np.meshgrid(*[a[s] for a, s in zip(self.axes, sl, strict=True)], indexing="ij")
        return sl, x, y, z  # type: ignore[return-value]

    def paint(self, box: Box, frac: np.ndarray, value: float, claim: bool = True) -> None:
        """Composite `value` with coverage `frac`; `claim` makes the base own those voxels (weight 1)."""
        self.hu[box] += frac * (np.float32(value) - self.hu[box])
        if claim:
            np.maximum(self.weight[box], frac, out=self.weight[box])

    def ellipsoid(self, c, a, yaw_deg: float = 0.0, pad: float = 3.0):
        r = max(a) + pad
        box, x, y, z = self._box(np.subtract(c, r), np.add(c, r))
        th = np.deg2rad(yaw_deg)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        u, v = np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy
        return box, (np.sqrt((u / a[0]) ** 2 + (v / a[1]) ** 2 + (dz / a[2]) ** 2) - 1.0) * min(a)

    def rounded_box(self, lo, hi, round_mm: float = 3.0):
        box, x, y, z = self._box(np.subtract(lo, 3), np.add(hi, 3))
        c, h = (np.array(lo) + hi) / 2, (np.array(hi) - lo) / 2 - round_mm
        q = [np.abs(g - ci) - hi_ for g, ci, hi_ in zip((x, y, z), c, h, strict=True)]
        outside = np.sqrt(sum(np.maximum(qi, 0) ** 2 for qi in q))
        return box, outside + np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0) - round_mm

    def capsule(self, a, b, radius: float, x_scale: float = 1.0):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = radius * max(x_scale, 1.0) + 3.0
        box, x, y, z = self._box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        ab = b - a
        px, py, pz = x - a[0], y - a[1], z - a[2]
        h = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
        dist = np.sqrt(((px - h * ab[0]) / x_scale) ** 2 + (py - h * ab[1]) ** 2 + (pz - h * ab[2]) ** 2)
        return box, dist - radius

    def cone(self, apex, base, radius: float):
        apex, base = np.asarray(apex, np.float32), np.asarray(base, np.float32)
        box, x, y, z = self._box(np.minimum(apex, base) - radius - 4, np.maximum(apex, base) + radius + 4)
        axis = base - apex
        length = float(np.linalg.norm(axis))
        u = axis / length
        px, py, pz = x - apex[0], y - apex[1], z - apex[2]
        along = px * u[0] + py * u[1] + pz * u[2]
        radial = np.sqrt(np.maximum(px**2 + py**2 + pz**2 - along**2, 0.0))
        side = (radial - along / length * radius) * (length / np.hypot(length, radius))
        return box, np.maximum(np.maximum(side, -along), along - length), side, along / length

    @staticmethod
    def cells(shape: tuple[int, ...], seed: int, size_vox: float = 1.3) -> np.ndarray:
        """0..1 air fraction of a honeycomb of air cells with bony septa (a fixed texture)."""
        white = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        noise = ndi.gaussian_filter(white, size_vox)
        return np.clip((noise / noise.std() + 0.35) / 0.5, 0.0, 1.0)


def build(env: np.ndarray) -> Base:
    """Skull base and face; `env` is the template's brain-envelope distance (mm) sampled on the base grid."""
    cv = _Canvas(env)
    full: Box = (slice(None), slice(None), slice(None))
    x, y, z = np.meshgrid(*cv.axes, indexing="ij")

    # Head outline below the vault (an approximate signed distance): scalp around the brain, face, neck, nose.
    outline = env - 13.0
    for solid in (cv.ellipsoid((0, 28, -60), (60, 66, 70)), cv.ellipsoid((0, -40, -100), (58, 58, 60)),
                  cv.capsule((0, 88, -38), (0, 104, -62), 9.0, x_scale=1.3)):
        box, d = solid
        outline[box] = np.minimum(outline[box], d)
    head = _ramp(outline)
    cv.paint(full, head, SOFT, claim=False)
    cv.paint(full, head * np.clip(1.0 - np.abs(-outline - 4.0) / 1.5, 0.0, 1.0), FAT, claim=False)
    # Thick skull-base bone hugging the underside of the brain (fossa floors, occipital bone).
    cv.paint(full, _ramp(np.maximum(1.5 - env, env - 9.0)) * head, BONE, claim=False)
    cv.paint(full, _ramp(np.maximum(3.5 - env, env - 6.5)) * head, CANCELLOUS, claim=False)
    # Below the brain the base owns everything; above it the vault model takes over by -16 mm.
    cv.weight = np.clip((-16.0 - z) / 14.0, 0.0, 1.0).astype(np.float32)

    for side in (-1, 1):
        # Petrous bone (dense otic capsule) along its antero-medial axis; inner-ear canal; ear canal; mastoid.
        box, d = cv.ellipsoid((side * 36, -27, -40), (27, 9, 9), yaw_deg=-side * 33)
        cv.paint(box, _ramp(d), DENSE)
        box, d = cv.ellipsoid((side * 49, -38, -49), (12, 13, 15))
        cv.paint(box, _ramp(d), BONE)
        cv.paint(box, _ramp(d) * cv.cells(d.shape, 11 + side), AIR)
        box, d = cv.capsule((side * 18, -21, -39), (side * 34, -23, -39), 2.2)
        cv.paint(box, _ramp(d), SOFT)
        box, d = cv.capsule((side * 52, -22, -44), (side * 80, -20, -44), 3.5)
        cv.paint(box, _ramp(d), AIR)
    # Clivus: sloping bone in front of the brainstem, from the dorsum sellae to the foramen magnum.
    box, d = cv.capsule((0, -9, -33), (0, -30, -64), 5.0, x_scale=1.5)
    cv.paint(box, _ramp(d), CANCELLOUS + 250)
    # Sinuses: a bony wall, then air.
    box, d = cv.ellipsoid((0, 12, -40), (16, 13, 11))
    cv.paint(box, _ramp(d - 1.5), BONE)
    cv.paint(box, _ramp(d), AIR)
    box, d = cv.rounded_box((-11, 28, -52), (11, 72, -27))
    cv.paint(box, _ramp(d), BONE)
    cv.paint(box, _ramp(d) * cv.cells(d.shape, 7, 0.8), AIR)
    for side in (-1, 1):
        box, d = cv.ellipsoid((side * 30, 50, -70), (14, 18, 18))
        cv.paint(box, _ramp(d - 1.5), BONE)
        cv.paint(box, _ramp(d), AIR)
    box, d = cv.rounded_box((-15, 22, -100), (15, 98, -50), 4.0)
    nasal = _ramp(d) * _ramp(outline[box] + 2.0)
    cv.paint(box, nasal, AIR)
    cv.paint(box, nasal * _ramp(np.abs(x[box]) - 1.0), 350.0)  # septum
    for side in (-1, 1):
        for zc in (-62.0, -76.0, -90.0):  # turbinates
            tb, d = cv.ellipsoid((side * 11, 55, zc), (5, 30, 4))
            cv.paint(tb, _ramp(d) * _ramp(outline[tb] + 2.0), SOFT)
    box, d = cv.ellipsoid((0, 80, -6), (17, 6, 12))
    e = env[box]
    cv.paint(box, _ramp(np.maximum(d - 1.2, np.maximum(1.0 - e, e - 10.0))), BONE)
    cv.paint(box, _ramp(np.maximum(d, np.maximum(2.5 - e, e - 8.5))), AIR)
    for side in (-1, 1):
        # Orbit: bony cone (thin medially, thicker laterally), fat, recti, optic nerve, globe and lens.
        apex, rim = (side * 14, 22, -34), (side * 33, 76, -37)
        box, d, lateral, along = cv.cone(apex, rim, 19.0)
        ox = cv.axes[0][box[0]][:, None, None]
        wall = 1.5 + 1.5 * np.clip(side * (ox - rim[0]) / 10.0, 0.0, 1.0)  # lamina papyracea vs lateral wall
        cv.paint(box, _ramp(np.maximum(lateral - wall, -lateral)) * np.clip((1.0 - along) * 8.0, 0.0, 1.0)
                 * (along > 0), BONE)
        cv.paint(box, _ramp(d), FAT)
        for off in (-1, 1):  # medial and lateral recti along the walls
            mb, md = cv.capsule((side * 17 + off * 3, 26, -34), (side * 33 + off * 13, 62, -37), 2.3)
            cv.paint(mb, _ramp(md), SOFT + 10)
        nb, nd = cv.capsule(apex, (side * 31, 52, -38), 2.0)
        cv.paint(nb, _ramp(nd), SOFT)
        gb, gd = cv.ellipsoid((side * 32, 64, -38), (12, 12, 12))
        cv.paint(gb, _ramp(gd), SOFT + 5)
        cv.paint(gb, _ramp(gd + 1.0), VITREOUS)
        lb, ld = cv.ellipsoid((side * 32, 73.5, -38), (4.5, 2.0, 4.5))
        cv.paint(lb, _ramp(ld), LENS)
    # The base never paints inside the brain envelope; nothing outside the head.
    cv.weight *= np.clip((env - 1.0) / SPACING, 0.0, 1.0)
    hu = np.where(outline < 2.0, cv.hu, AIR).astype(np.float32)
    return Base(hu=hu, weight=cv.weight.astype(np.float32), origin=ORIGIN.copy(), spacing=SPACING)


def grid_points() -> np.ndarray:
    """(3, X, Y, Z) template mm of the base grid (to sample the envelope distance on it)."""
    return np.stack(np.meshgrid(*[(ORIGIN[k] + np.arange(SHAPE[k]) * SPACING).astype(np.float32)
                                  for k in range(3)], indexing="ij"))
