"""The synthetic data set on disk: study folders (CQ500 layout), reads.csv, truth.csv, generated in parallel.

    <out>/SYNCT<n> SYNCT<n>/Unknown Study/<SeriesDescription>/CT000000[.dcm] ...
    <out>/reads.csv    name, Category, R1:<label>..., R2:<label>..., R3:<label>...   (CQ500 style)
    <out>/truth.csv    the generator's truth per study: lesion volumes (mL), severity stratum, mass effect and
                       the oracle feature (headct/data/synth/truth.py); never a label file

Output is deterministic given the seed: each study's randomness comes from (seed, study index), so the
number of worker processes does not change a byte of pixel data.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from headct.config.base import LABELS
from headct.config.data import SynthConfig
from headct.data.synth import dicom_writer, truth
from headct.data.synth.plan import StudyPlan, plan_studies
from headct.data.synth.study import StudyResult, write_study
from headct.errors import InputError
from headct.io import atomic_path

MARKER = ".headct-synth.json"  # marks a folder this generator owns (and may replace)
NOT_DICOM = {".csv", ".json", ".png"}


def generate(cfg: SynthConfig, out: Path, plans: list[StudyPlan] | None = None,
             progress: bool = True) -> list[StudyResult]:
    """Write the whole data set into `out` (which should be empty); returns one result per study."""
    plans = plans if plans is not None else plan_studies(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_reads(out / "reads.csv", plans)
    results = _render_all(cfg, out, plans, progress)
    write_truth(out / truth.TRUTH, plans, results)  # volumes and the oracle are measured while rendering
    (out / MARKER).write_text(json.dumps({"generator": "headct synth", "seed": cfg.seed,
                                          "n_patients": cfg.n_patients}) + "\n")
    return results


def _render_all(cfg: SynthConfig, out: Path, plans: list[StudyPlan], progress: bool) -> list[StudyResult]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    args = (out, cfg.seed, cfg.matrix, cfg.pixel_mm)
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    results: list[StudyResult] = []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("studies", total=len(plans))
        if cfg.workers == 1 or len(plans) == 1:
            for plan in plans:
                results.append(write_study(plan, *args))
                bar.advance(task)
        else:
            # spawn: workers start clean (no inherited torch/OpenMP state) and build the template once each.
            ctx = multiprocessing.get_context("spawn")
            workers = min(cfg.workers, len(plans))
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
            try:
                futures = [pool.submit(write_study, plan, *args) for plan in plans]
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.advance(task)
            finally:  # on a failure, do not render the remaining studies first
                pool.shutdown(cancel_futures=True)
    return sorted(results, key=lambda r: r.index)


def _init_worker() -> None:
    import torch

    from headct.data.synth.template import load_template

    torch.set_num_threads(1)
    load_template()


def reads_header() -> list[str]:
    return ["name", "Category"] + [f"R{r}:{label}" for r in (1, 2, 3) for label in LABELS]


def write_reads(path: Path, plans: list[StudyPlan]) -> None:
    """CQ500-style reads: three readers, 0/1 per canonical label (majority = the truth)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(reads_header())
        for plan in plans:
            row = [plan.name, "B1" if plan.index % 2 == 0 else "B2"]
            row += [plan.reads[r][label] for r in range(3) for label in LABELS]
            writer.writerow(row)


def write_truth(path: Path, plans: list[StudyPlan], results: list[StudyResult]) -> None:
    """The generator's truth per study (truth.py has the columns): what was planned and what was measured."""
    rows = []
    for p, r in zip(plans, results, strict=True):
        bleed = sum(v for k, v in r.volumes_ml.items() if k in truth.BLEEDS)
        rows.append({
            "name": p.name, "findings": ";".join(f"{f.kind}:{f.side}" for f in p.findings),
            **{f"{k}_ml": round(v, 3) for k, v in r.volumes_ml.items()},
            "bleed_ml": round(bleed, 3), "stratum": truth.stratum_of(round(bleed, 3)),
            "midline_shift_mm": p.midline_shift_mm, "displacement_mm": p.displacement_mm,
            "oracle_series": r.oracle_series, "oracle_noise_hu": round(r.oracle_noise_hu, 3),
            **{truth.visible_column(g, s): n for (g, s), n in r.visible.items()},
            "reader_flips": ";".join(f"{reader}:{label}" for reader, label in p.flips), "age": p.subject.age,
        })
    truth.write_truth(path, rows)


def read_reads(path: Path) -> dict[str, dict[str, tuple[int, int, int]]]:
    """name -> label -> (R1, R2, R3) from a reads.csv."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {row["name"]: {label: tuple(int(row[f"R{r}:{label}"]) for r in (1, 2, 3)) for label in LABELS}
            for row in rows}


@contextlib.contextmanager
def replacing(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it replaces `dest` (no stale studies remain).

    Refuses to replace a non-empty folder that this generator did not make (no marker file)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise InputError(f"{dest}: folder is not empty and was not made by `headct synth`; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    for leftover in (*dest.parent.glob(f".{dest.name}.partial-*"), *dest.parent.glob(f".{dest.name}.old-*")):
        shutil.rmtree(leftover)  # from a run that was killed before it could clean up
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            os.replace(old, dest)  # put the previous data set back
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def dicom_files(raw_dir: Path) -> Iterator[Path]:
    for path in sorted(Path(raw_dir).rglob("*")):
        if path.is_file() and path.suffix.lower() not in NOT_DICOM:
            yield path


def identifying_values(raw_dir: Path, uids: bool = True) -> set[str]:
    """Identifying header values (PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName)
    read back from every DICOM file of a generated set, plus (uids=True) every Study/Series/SOP/Frame UID.

    Tests of the whole chain scan every output for these strings: none may leak."""
    found: set[str] = set()
    for path in dicom_files(raw_dir):
        values, file_uids = dicom_writer.read_identifying(path)
        found.update(values)
        if uids:
            found.update(file_uids)
    return found


def raw_uids(raw_dir: Path) -> set[str]:
    """Every Study/Series/SOP/FrameOfReference UID of a generated set."""
    found: set[str] = set()
    for path in dicom_files(raw_dir):
        found.update(dicom_writer.read_identifying(path)[1])
    return found
