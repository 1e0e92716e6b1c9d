"""Per-subject anatomy: the random parameters of one head (shape, pose, age, skull build, tissue HU).

Three coordinate frames are used throughout the generator (all in mm):
- template `t`: MNI152 space, RAS+ (+x towards the patient's right, +y anterior, +z superior), where the tissue
  maps live (template.py);
- patient `p`: the subject's RAS frame, p = L @ t + translation (L = rotation @ scale), plus a smooth warp;
- DICOM LPS: see `headct.data.synth.scanner.patient_to_lps`.
The phantom (phantom.py) is a (nx, ny, nz) float32 HU volume on a 1.5 mm `Grid` in the patient frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headct.data.synth.template import Template

GRID_MM = 1.5  # phantom voxel size: fine enough for 2 mm skull tables and few-mm lesions, coarse enough for speed
FOV_CENTRE_Y = -15.0  # patient y (mm) of the scanner's field-of-view centre: the middle of the MNI head
# Face points beyond the brain envelope + scalp (nose tip, cheeks), template mm, for sizing the phantom grid.
_FACE_POINTS = np.array([[0.0, 113.0, -62.0], [0.0, 106.0, -40.0], [-45.0, 90.0, -60.0], [45.0, 90.0, -60.0]])


# -------------------------------------------------------------------------------------------------- subject
@dataclass(frozen=True)
class Subject:
    """Everything random about one head; rendering is a pure function of it (and the grid).

    HU values are sampled within REFERENCE.md section 3; lengths in mm; angles in degrees.
    """

    age: int
    scale: tuple[float, float, float]  # per-axis template -> patient scaling (head size and shape)
    rotation_deg: tuple[float, float, float]  # about x (pitch: chin up/down), y (roll), z (yaw)
    translation_mm: tuple[float, float, float]  # head centre offset in the scanner's field of view
    warp_mm: np.ndarray  # (3, 3, 3, 3) coefficients of the smooth non-linear warp (template mm)
    sulcal_atrophy: float  # 0..0.5: threshold raised on the tissue fraction, widening sulci
    ventricle_mm: float  # ventricles grow by this much (mm) with age
    csf_gap_mm: float  # envelope to inner table: extra-axial CSF
    inner_mm: float
    diploe_mm: float
    outer_mm: float
    galea_mm: float
    fat_mm: float
    skin_mm: float
    hu_grey: float
    hu_white: float
    hu_csf: float
    hu_cortical: float
    hu_diploe: float
    hu_soft: float
    hu_fat: float
    hu_falx: float
    rim_hu: float  # beam-hardening "pseudo-rim" just inside the inner table (a subdural look-alike)
    # (site, centre t mm, radius mm, HU); the choroid sites sit in the template's ventricular atria instead
    calcifications: tuple[tuple[str, tuple[float, float, float], float, float], ...]

    @property
    def scalp_extent_mm(self) -> float:
        """Envelope to skin surface at its thickest (over the temporalis), template mm."""
        return (self.csf_gap_mm + self.inner_mm + self.diploe_mm + self.outer_mm + self.galea_mm + self.fat_mm
                + self.skin_mm + 5.0)

    def linear(self) -> np.ndarray:
        """3x3 matrix taking template mm to patient mm (rotation @ scale)."""
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx @ np.diag(self.scale)

    def to_patient(self, t: np.ndarray) -> np.ndarray:
        """Template mm (..., 3) -> patient RAS mm (..., 3), ignoring the small non-linear warp."""
        return np.asarray(t) @ self.linear().T + np.array(self.translation_mm) + np.array([0, FOV_CENTRE_Y, 0])


def sample_subject(rng: np.random.Generator) -> Subject:
    """Draw one subject: shape, pose, age-related atrophy, skull build and tissue HU."""
    age = int(rng.integers(18, 96))
    old = max(0.0, (age - 40) / 55.0)  # 0 below 40, 1 at 95
    # The MNI152 head is large (about 218 mm long with scalp): adult heads are 0.86-0.98 of it, +-5% per axis.
    scale = tuple(float(s) for s in rng.uniform(0.95, 1.05, 3) * rng.uniform(0.86, 0.98))
    grey = rng.uniform(35.0, 45.0)
    white = rng.uniform(max(20.0, grey - 16.0), min(30.0, grey - 8.0))
    calcs: list[tuple[str, tuple[float, float, float], float, float]] = []
    if rng.random() < 0.35 + 0.4 * old:  # pineal: common after adolescence
        calcs.append(("pineal", (0.0, -30.0 + rng.normal(0, 1.5), 2.0 + rng.normal(0, 1.5)),
                      float(rng.uniform(1.5, 3.5)), float(rng.uniform(120, 400))))
    if rng.random() < 0.25 + 0.5 * old:  # choroid plexus glomus in both atria
        r, hu = float(rng.uniform(1.5, 4.0)), float(rng.uniform(110, 350))
        calcs.extend([("atrium_left", (-27.0, -40.0, 14.0), r, hu),
                      ("atrium_right", (27.0, -40.0, 14.0), r * rng.uniform(0.7, 1.2), hu)])
    if rng.random() < 0.08 + 0.15 * old:  # physiological basal-ganglia (pallidal) calcification, bilateral
        r, hu = float(rng.uniform(1.5, 3.0)), float(rng.uniform(100, 250))
        calcs.extend([("pallidum", (-19.0, -3.0, -1.0), r, hu), ("pallidum", (19.0, -3.0, -1.0), r, hu)])
    if rng.random() < 0.15 + 0.35 * old:  # falx calcification plaques
        for _ in range(int(rng.integers(1, 4))):
            calcs.append(("falx", (0.0, float(rng.uniform(-60, 40)), float(rng.uniform(25, 60))),
                          float(rng.uniform(1.0, 2.5)), float(rng.uniform(150, 600))))
    return Subject(
        age=age,
        scale=scale,  # type: ignore[arg-type]
        rotation_deg=(float(rng.normal(0, 5)), float(rng.normal(0, 2.5)), float(rng.normal(0, 2.5))),
        translation_mm=(float(np.clip(rng.normal(0, 3), -6, 6)), float(np.clip(rng.normal(0, 3), -6, 6)), 0.0),
        warp_mm=rng.normal(0, 1.0, (3, 3, 3, 3)) / (1.0 + np.add.outer(np.add.outer(np.arange(3), np.arange(3)),
                                                                   np.arange(3)))[None],
        sulcal_atrophy=float(np.clip(0.08 + 0.35 * old + rng.normal(0, 0.05), 0.0, 0.5)),
        ventricle_mm=float(np.clip(0.5 + 4.0 * old + rng.normal(0, 0.7), 0.0, 6.0)),
        csf_gap_mm=float(np.clip(0.8 + 2.2 * old + rng.normal(0, 0.4), 0.4, 4.0)),
        inner_mm=float(rng.uniform(1.5, 2.5)),
        diploe_mm=float(rng.uniform(2.0, 5.0)),
        outer_mm=float(rng.uniform(2.0, 3.5)),
        galea_mm=float(rng.uniform(0.8, 1.5)),
        fat_mm=float(rng.uniform(2.5, 6.0)),
        skin_mm=float(rng.uniform(1.5, 2.5)),
        hu_grey=float(grey),
        hu_white=float(white),
        hu_csf=float(rng.uniform(2.0, 12.0)),
        hu_cortical=float(rng.uniform(1200.0, 1800.0)),
        hu_diploe=float(rng.uniform(400.0, 700.0)),
        hu_soft=float(rng.uniform(30.0, 50.0)),
        hu_fat=float(rng.uniform(-110.0, -80.0)),
        hu_falx=float(rng.uniform(50.0, 90.0)),
        rim_hu=float(rng.uniform(0.0, 8.0)),
        calcifications=tuple(calcs),
    )


# ------------------------------------------------------------------------------------------------ phantom grid
@dataclass(frozen=True)
class Grid:
    """An axis-aligned grid in the patient RAS frame: voxel (i, j, k) sits at origin + (i, j, k) * spacing."""

    origin: np.ndarray  # (3,) mm
    shape: tuple[int, int, int]
    spacing: float = GRID_MM

    def axis(self, k: int) -> np.ndarray:
        return (self.origin[k] + np.arange(self.shape[k]) * self.spacing).astype(np.float32)


def phantom_grid(tpl: Template, subject: Subject, z_range: tuple[float, float], fov_mm: float,
                 margin_mm: float) -> Grid:
    """Grid covering the subject's head (brain envelope + `margin_mm` of skull and scalp, and the face)
    within the field of view and the z range."""
    pts = subject.to_patient(np.concatenate([tpl.surface_points, _FACE_POINTS]))
    pad = margin_mm * max(subject.scale) + 6.0  # + the non-linear warp
    half = fov_mm / 2.0 + 2 * GRID_MM
    box_lo = np.maximum(pts.min(0) - pad, [-half, FOV_CENTRE_Y - half, z_range[0]])
    box_hi = np.minimum(pts.max(0) + pad, [half, FOV_CENTRE_Y + half, z_range[1]])
    shape = tuple(int(np.ceil((h - a) / GRID_MM)) + 1 for a, h in zip(box_lo, box_hi, strict=True))
    return Grid(origin=box_lo.astype(np.float64), shape=shape)  # type: ignore[arg-type]
