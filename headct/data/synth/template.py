"""The static anatomy template in MNI152 space, built once per process from nilearn's bundled maps.

Tissue fractions (grey/white matter) at 1 mm, the signed distance to the brain envelope and the distance to
the ventricles at 2 mm, and the modelled skull base (skullbase.py). `sample` reads any of them trilinearly at
template mm coordinates (torch grid_sample: one call serves millions of points).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from headct.errors import InputError

TEMPLATE_ORIGIN = np.array([-98.0, -134.0, -72.0])  # MNI mm of voxel (0, 0, 0) of the 1 mm maps
_TEMPLATE_SHAPE = (197, 233, 189)


@dataclass(frozen=True)
class Template:
    """Static anatomy in MNI space, built once per process.

    brain: (3, 197, 233, 189) float32 at 1 mm: tissue fraction T = GM + WM (0..1), white-matter share S and
        the distance to the ventricles Vd (mm, upsampled from 2 mm).
    coarse: (2, 99, 117, 95) float32 at 2 mm over the same box: E = signed distance to the brain envelope
        (mm, > 0 outside) and Vd = distance to the ventricles (mm, 0 inside).
    base: (2, X, Y, Z) float32 skull-base/face canonical HU and blend weight on their own grid, whose voxel
        (0, 0, 0) is at `base_origin` (mm) with `base_spacing` (see `skullbase.py`).
    """

    brain: np.ndarray
    coarse: np.ndarray
    base: np.ndarray
    base_origin: np.ndarray
    base_spacing: float
    ventricle_points: dict[str, np.ndarray] = field(default_factory=dict)
    deep_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3) mm, brain >= 15 mm deep
    surface_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3) mm on the envelope


def template_files() -> dict[str, Path]:
    """Paths of the MNI152 2009a maps shipped inside the nilearn wheel (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("nilearn is not installed: the synthetic generator needs its bundled MNI152 maps")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise InputError(f"{path}: MNI152 map missing from the nilearn package (reinstall nilearn)")
    return files


def _load_map(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    if data.shape != _TEMPLATE_SHAPE or not np.allclose(img.affine[:3, 3], TEMPLATE_ORIGIN):
        raise InputError(f"{path}: unexpected MNI grid {data.shape} / origin {img.affine[:3, 3].tolist()}")
    return data


def _edt_signed(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (mm) to the surface of `mask`: negative inside, positive outside."""
    outside = ndi.distance_transform_edt(~mask, sampling=spacing)
    inside = ndi.distance_transform_edt(mask, sampling=spacing)
    return (outside - inside).astype(np.float32)


def _ventricles(tissue2: np.ndarray, env_dist2: np.ndarray) -> np.ndarray:
    """Ventricular CSF on the 2 mm grid: lateral ventricles (the two large deep CSF bodies) + 3rd and 4th."""
    csf = (tissue2 < 0.45) & (env_dist2 < -8.0)
    labels, n = ndi.label(csf)
    mask = np.zeros_like(csf)
    mm = np.stack(np.meshgrid(*[np.arange(s) * 2.0 + o for s, o in zip(csf.shape, TEMPLATE_ORIGIN, strict=True)],
                              indexing="ij"))
    for seed in ((-14.0, -12.0, 16.0), (14.0, -12.0, 16.0)):  # bodies of the lateral ventricles
        idx = tuple(int(round((c - o) / 2.0)) for c, o in zip(seed, TEMPLATE_ORIGIN, strict=True))
        near = labels[idx[0] - 3 : idx[0] + 4, idx[1] - 3 : idx[1] + 4, idx[2] - 3 : idx[2] + 4]
        ids = np.unique(near[near > 0])
        for i in ids:
            comp = labels == i
            if comp.sum() < 5000:  # the fissure/cistern body is one big component: skip it
                mask |= comp
    x, y, z = mm
    third = csf & (np.abs(x) < 4.0) & (y > -26) & (y < 2) & (z > -10) & (z < 12)
    fourth = csf & (np.abs(x) < 8.0) & (y > -56) & (y < -36) & (z > -42) & (z < -20)
    return mask | third | fourth


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Build the static template (about 1-2 s): tissue maps, envelope distance, ventricles, skull base."""
    from headct.data.synth import skullbase

    files = template_files()
    gm, wm = _load_map(files["gm"]), _load_map(files["wm"])
    tissue = np.clip(gm + wm, 0.0, 1.0)
    share = np.where(tissue > 0.02, wm / np.maximum(gm + wm, 1e-3), 0.5).astype(np.float32)
    # The envelope bridges sulci and fissures (closing by 6 mm on the 2 mm grid), so the skull's inner table
    # follows the brain's outer surface rather than its gyri.
    t2 = ndi.uniform_filter(tissue, 2)[::2, ::2, ::2]
    brain2 = t2 > 0.5
    dilated = ndi.distance_transform_edt(~brain2) <= 3
    closed = dilated & (ndi.distance_transform_edt(dilated) > 3)
    envelope = ndi.binary_fill_holes(closed | brain2)
    env_dist = ndi.gaussian_filter(_edt_signed(envelope, 2.0), 0.75)
    vent = _ventricles(t2, env_dist)
    vent_dist = ndi.distance_transform_edt(~vent, sampling=2.0).astype(np.float32)
    coarse = np.stack([env_dist, vent_dist]).astype(np.float32)
    base = skullbase.build(sample(env_dist[None], TEMPLATE_ORIGIN, 2.0, skullbase.grid_points())[0])
    points = {}
    vx = np.argwhere(vent) * 2.0 + TEMPLATE_ORIGIN
    for name, guess in (("atrium_left", (-27.0, -40.0, 14.0)), ("atrium_right", (27.0, -40.0, 14.0))):
        points[name] = vx[np.argmin(((vx - np.array(guess)) ** 2).sum(1))]
    deep = np.argwhere((t2[::4, ::4, ::4] > 0.5) & (env_dist[::4, ::4, ::4] < -15.0)) * 8.0 + TEMPLATE_ORIGIN
    shell = (np.abs(env_dist) < 1.5) & (np.indices(env_dist.shape).sum(0) % 2 == 0)
    return Template(
        deep_points=deep,
        surface_points=np.argwhere(shell) * 2.0 + TEMPLATE_ORIGIN,
        brain=np.ascontiguousarray(np.stack([tissue, share, _upsample2(vent_dist, tissue.shape)])),
        coarse=np.ascontiguousarray(coarse),
        base=np.ascontiguousarray(np.stack([base.hu, base.weight])),
        base_origin=base.origin,
        base_spacing=base.spacing,
        ventricle_points=points,
    )


def lookup(tpl: Template, points: np.ndarray) -> dict[str, np.ndarray]:
    """Template values at a few points (N, 3) mm: tissue fraction, envelope distance, ventricle distance."""
    pts = np.asarray(points, np.float32).T
    tissue = sample(tpl.brain[:1], TEMPLATE_ORIGIN, 1.0, pts)[0]
    env, vent = sample(tpl.coarse, TEMPLATE_ORIGIN, 2.0, pts)
    return {"tissue": tissue, "env": env, "vent": vent}


def surface_point(tpl: Template, direction: np.ndarray, centre=(0.0, -18.0, 10.0)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Where a ray from the head centre leaves the brain envelope: (point, outward normal), template mm."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    radii = np.arange(0.0, 130.0, 1.0)
    env = lookup(tpl, np.asarray(centre) + radii[:, None] * d)["env"]
    r = radii[int(np.argmax(env > 0))]
    point = np.asarray(centre) + r * d
    eps = np.eye(3) * 2.0
    grad = lookup(tpl, np.concatenate([point + eps, point - eps]))["env"]
    normal = grad[:3] - grad[3:]
    return point, normal / max(np.linalg.norm(normal), 1e-6)


def _upsample2(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """2 mm -> 1 mm over the same box (voxel i of the coarse grid is voxel 2i of the fine one)."""
    import torch
    import torch.nn.functional as F

    out = F.interpolate(torch.from_numpy(volume)[None, None], size=shape, mode="trilinear", align_corners=True)
    return out[0, 0].numpy()


def sample(volume: np.ndarray, origin: np.ndarray, spacing: float, coords: np.ndarray) -> np.ndarray:
    """Trilinear samples of `volume` (C, X, Y, Z) at template mm `coords` (3, ...) -> (C, ...) float32.

    Outside the volume the border value repeats (the brainstem continues as the cord below the template).
    """
    import torch
    import torch.nn.functional as F

    shape = volume.shape[1:]
    size = np.array([(n - 1) * spacing for n in shape], np.float32)
    grid = np.empty((*coords.shape[1:], 3), np.float32)
    for k in range(3):  # grid_sample wants (W, H, D) = (z, y, x) order, normalised to [-1, 1]
        grid[..., 2 - k] = (coords[k] - np.float32(origin[k])) * np.float32(2.0 / size[k]) - 1.0
    flat = torch.from_numpy(grid).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(torch.from_numpy(volume)[None], flat, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[0, :, :, 0, 0].numpy().reshape(volume.shape[0], *coords.shape[1:])
