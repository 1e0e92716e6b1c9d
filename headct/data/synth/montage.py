"""A PNG montage of generated studies: the key axial slice of each in the brain, subdural and bone windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headct.config.base import DEFAULT_WINDOWS, LABELS
from headct.data.synth.plan import StudyPlan
from headct.data.synth.study import StudyResult
from headct.io import atomic_path

SHOWCASE = ("normal", "IPH", "SDH", "EDH", "SAH", "IVH", "ChronicBleed", "Tumor", "CalvarialFracture")


def pick_studies(plans: list[StudyPlan], limit: int = len(SHOWCASE)) -> list[tuple[int, str]]:
    """(study index, kind) for one normal study and one positive per showcased finding (the clearest:
    largest first, fewest other findings)."""
    chosen: list[int] = []
    kinds: list[str] = []
    for kind in SHOWCASE[:limit]:
        if kind == "normal":
            pool = [p for p in plans if not any(p.labels.values())]
        else:
            pool = [p for p in plans if any(f.kind == kind for f in p.findings)]
        pool = [p for p in pool if p.index not in chosen]
        if pool:
            best = min(pool, key=lambda p: (-_size(p, kind), len(p.findings), p.index))
            chosen.append(best.index)
            kinds.append("any" if kind == "normal" else kind)
    return list(zip(chosen, kinds, strict=True))


def _size(plan: StudyPlan, kind: str) -> float:
    """How conspicuous the study's finding of `kind` is (mm: radius, thickness, layer depth, spread...)."""
    sizes = []
    for f in plan.findings:
        if f.kind != kind:
            continue
        size = max(float(f.params.get(key, 0.0)) for key in ("radius", "thickness", "depth", "spread", "length"))
        if kind == "CalvarialFracture":  # wide lines through the vault, across the axial plane, show best
            size *= float(f.params["width"]) * (1.0 - abs(float(f.params["pz"]))) * (0 < f.centre[2] < 50)
        sizes.append(size)
    return max(sizes, default=0.0)


def read_series_hu(folder: Path) -> np.ndarray:
    """(n, rows, cols) HU of an axial series read back with pydicom, ordered by ImagePositionPatient z."""
    import pydicom

    slices = [pydicom.dcmread(path) for path in sorted(folder.iterdir()) if path.is_file()]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])


def title(plan: StudyPlan) -> str:
    positive = [label for label in LABELS if plan.labels[label] and label not in ("ICH", "Fracture")]
    text = ", ".join(positive) if positive else "normal"
    if plan.labels["MidlineShift"]:
        text += f" ({plan.midline_shift_mm:.0f} mm)"
    return f"{plan.name}: {text}"


def write_montage(raw_dir: Path, plans: list[StudyPlan], results: list[StudyResult], dest: Path) -> list[int]:
    """Render the montage to `dest` (PNG); returns the study indices shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = pick_studies(plans)
    by_index = {r.index: r for r in results}
    fig, axes = plt.subplots(len(shown), 3, figsize=(9.6, 3.3 * len(shown)), squeeze=False)
    for row, (index, kind) in enumerate(shown):
        result = by_index[index]
        hu = read_series_hu(raw_dir / result.main_series)
        image = hu[min(result.key_slices.get(kind, result.key_slices["any"]), len(hu) - 1)]
        for col, window in enumerate(DEFAULT_WINDOWS):
            ax = axes[row, col]
            lo, hi = window.level - window.width / 2, window.level + window.width / 2
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
            ax.set_axis_off()
            heading = title(plans[index]) if col == 1 else ""
            ax.set_title(f"{heading}\n{window.name} {window.level:g}/{window.width:g}", fontsize=8)
    top = 1.0 - 0.5 / fig.get_figheight()  # half an inch for the heading
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.suptitle("headct synth: key axial slice per study (patient's right on the image left)", fontsize=10,
                 y=1.0 - 0.15 / fig.get_figheight())
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return [index for index, _ in shown]
