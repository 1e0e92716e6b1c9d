"""Ingest speed: `headct ingest` vs the seed's MONAI chain vs dcm2niix + the same MONAI tail, on the same DICOM series.

Methods (one thread each: OMP/MKL/OpenBLAS env set before import, torch.set_num_threads(1); headct's runs share one
worker process and the MONAI chains another, so neither imports the other's libraries):
  headct (wN)     the library call behind `headct ingest SRC DEST` (discovery, QC, selection, HU, head localisation,
                  trilinear resampling to 96^3 at 2 mm, int16 .npy + manifest + rejects), workers=N processes
                  (1 worker = 1 process = 1 thread). A fresh DEST each run, so nothing is reused. Its pool
                  forks workers from a forkserver that imported ingest's modules once (headct.data.parallel),
                  started by the warm-up pass like every other import of these long-lived benchmark processes.
  MONAI+pydicom   the seed's recipe (shared/REFERENCE.md section 1), per series folder: LoadImage(PydicomReader),
                  EnsureChannelFirst, Orientation RAS, Spacing 1 mm isotropic (cubic spline, mode=3),
                  CropForeground (> 0 HU), the three windows as channels (brain 40/80, subdural 80/200,
                  bone 600/2800, clipped to [0, 1]), Resize 96^3, fp16, saved as .npy (the seed's cache).
  dcm2niix+MONAI  `dcm2niix` (PyPI build; uncompressed .nii, no sidecar) per series, then LoadImage(NibabelReader)
                  and the same MONAI tail.
Fair by construction: the same inputs, one thread each side, a warm-up pass per method (page cache, lazy imports),
then the methods alternate run by run and the minimum of the timed runs is reported (background load hurts all
alike). Beside them: the reading limit (input bytes over the disk's sequential read bandwidth, measured on a fresh
file evicted from the page cache) and the decoding limit (pydicom read + pixel decode + rescale of every file,
one thread, warm cache; measured before the runs and after each round of them, the minimum kept), both as series/s;
and, for headct's worker counts k > 1, what k processes of pure CPU work get over one on this machine at the time
(cores shared with other jobs show here; measured before and after the runs, the higher kept), the ceiling for
headct's scaling. The JSON's `targets` holds issue 16's three figures with their targets (the seed's chain's time
over headct's >= 10, headct's time over the decoding limit <= 2, k workers' speedup >= 0.85 of the ceiling) and
`load_average_1_5_15_min` the machine's load at the start and the end. Beside every wall time the JSON holds the
CPU time of the process that ran it (`cpu_seconds_*`, `decode_cpu_seconds`; for headct with several workers the
parent's only), steadier than wall time when other jobs share the cores.

Inputs (cached under --data, reused when present): --source synth (default) generates --series studies with the
project's synthetic generator (`headct synth`: one axial series each, --matrix^2 pixels over a 230 mm field,
--slice-mm thick; 512 and 1.25 mm give ~115 slices of 512x512, a thin clinical head CT), or --source real writes
the real head CT of tests/real_ct.py (256x256x108, fetched from Debian) --series times with new UIDs and a
one-HU jitter so no copy is a duplicate of another.

Run: .venv/bin/python benchmarks/ingest.py                                    (8 series of 512x512x~115)
     .venv/bin/python benchmarks/ingest.py --series 2 --matrix 64 --slice-mm 5 --repeats 1 --warmup 0  (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1"}
WINDOWS = (("brain", 40.0, 80.0), ("subdural", 80.0, 200.0), ("bone", 600.0, 2800.0))  # level, width (HU)
SEED_SHAPE = (96, 96, 96)
FOV_MM = 230.0  # synthetic in-plane field of view


# ------------------------------------------------------------------------------------------------------ inputs
def series_folders(root: Path) -> list[Path]:
    """Folders directly holding DICOM files (by the DICM preamble), sorted."""
    folders = set()
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    folders.add(Path(folder))
                    break
    return sorted(folders)


def make_synth(out: Path, n: int, matrix: int, slice_mm: float, seed: int) -> None:
    from headct.config import SynthConfig
    from headct.data.synth.dataset import generate

    cfg = SynthConfig(out=out, n_patients=n, seed=seed, matrix=matrix, pixel_mm=round(FOV_MM / matrix, 4),
                      slice_thickness_mm=slice_mm, extra_series_fraction=0.0, workers=min(2, n))
    generate(cfg, out, progress=True)


def make_real(out: Path, n: int) -> None:
    import numpy as np
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(REPO / "tests"))
    import real_ct

    ct = real_ct.cranium()
    rng = np.random.default_rng(0)
    for i in range(n):  # a one-HU jitter per copy: the same scan exported twice would be (rightly) a duplicate
        jitter = rng.integers(0, 2, ct.hu.shape, dtype=np.int16)
        copy = real_ct.RealCT(hu=np.clip(ct.hu + jitter, -1024, 3071).astype(np.int16), spacing=ct.spacing)
        patient = {**real_ct.FAKE_PATIENT, "PatientID": f"BENCH-REALCT-{i:04d}"}
        real_ct.write_dicom_series(copy, out / f"study{i:04d}" / "series", study_uid=generate_uid(),
                                   series_uid=generate_uid(), patient=patient)


def prepare_inputs(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The DICOM source folder and its series folders, generated once and cached under --data."""
    if args.source == "synth":
        name = f"synth-n{args.series}-m{args.matrix}-t{args.slice_mm:g}-s{args.seed}"
    else:
        name = f"real-n{args.series}"
    src = args.data / name
    done = src / ".bench-complete"
    if not done.is_file():
        shutil.rmtree(src, ignore_errors=True)
        print(f"generating {name} under {args.data} ...", flush=True)
        (make_synth(src, args.series, args.matrix, args.slice_mm, args.seed) if args.source == "synth"
         else make_real(src, args.series))
        done.write_text("ok\n")
    folders = series_folders(src)
    if len(folders) != args.series:
        raise SystemExit(f"{src} holds {len(folders)} series, expected {args.series}: delete it and re-run")
    return src, folders


def dicom_files(folders: list[Path]) -> list[Path]:
    return [p for folder in folders for p in sorted(folder.iterdir()) if p.is_file()]


def input_facts(folders: list[Path]) -> dict:
    import pydicom

    files = dicom_files(folders)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    slices = [sum(1 for p in f.iterdir() if p.is_file()) for f in folders]
    return {"series": len(folders), "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "rows": int(first.Rows), "columns": int(first.Columns),
            "pixel_spacing_mm": [float(v) for v in first.PixelSpacing],
            "slice_thickness_mm": float(first.SliceThickness),
            "slices_per_series": {"min": min(slices), "max": max(slices), "mean": sum(slices) / len(slices)},
            "transfer_syntax": str(first.file_meta.TransferSyntaxUID.name)}


# ------------------------------------------------------------------------------------------------------ limits
def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(paths: list[Path], chunk: int = 8 << 20) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while block := fh.read(chunk):
                total += len(block)
    return total


def disk_read_mb_s(folder: Path, size_mb: int) -> float:
    """Sequential read bandwidth of a fresh file of random bytes evicted from the page cache (MB/s, 1e6 bytes)."""
    path = folder / ".bench-disk-probe"
    block = os.urandom(8 << 20)
    with open(path, "wb") as fh:
        for _ in range(max(1, size_mb // 8)):
            fh.write(block)
    try:
        _evict(path)
        start = time.perf_counter()
        total = _read_all([path])
        return total / 1e6 / (time.perf_counter() - start)
    finally:
        path.unlink()


def cold_read_mb_s(files: list[Path]) -> float:
    """Reading the DICOM files themselves after evicting them from the page cache (MB/s)."""
    for path in files:
        _evict(path)
    start = time.perf_counter()
    total = _read_all(files)
    return total / 1e6 / (time.perf_counter() - start)


def decode_seconds(files: list[Path], warm: bool = True) -> tuple[float, float]:
    """pydicom read + pixel decode + rescale to float32 HU for every file (warm cache, one thread): (wall, CPU) s."""
    import numpy as np
    import pydicom

    if warm:
        _read_all(files)
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    return time.perf_counter() - start, time.process_time() - cpu


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_scaling_ceiling(k: int, n: int = 10_000_000, repeats: int = 3) -> float:
    """What k processes of pure CPU work get over one on this machine now (shared cores show here): k * t1 / tk."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(k) as pool:
        pool.map(_burn, [10] * k)
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            pool.map(_burn, [n])
            one = time.perf_counter() - start
            start = time.perf_counter()
            pool.map(_burn, [n] * k)
            best = max(best, k * one / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------------------------- the methods
def _seed_tail():
    """The seed's preprocessing after loading: RAS, 1 mm cubic, crop > 0 HU, 3 windows, resize 96^3, fp16."""
    import torch
    from monai.transforms import (
        CastToType,
        Compose,
        CropForeground,
        EnsureChannelFirst,
        Lambda,
        Orientation,
        Resize,
        ScaleIntensityRange,
        Spacing,
    )

    windows = [ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0,
                                   clip=True) for _, level, width in WINDOWS]
    return Compose([
        EnsureChannelFirst(),
        Orientation(axcodes="RAS"),
        Spacing(pixdim=(1.0, 1.0, 1.0), mode=3),  # spline order 3 (scipy): the seed's cubic resampling
        CropForeground(select_fn=lambda x: x > 0, allow_smaller=True),
        Lambda(lambda img: torch.cat([w(img) for w in windows], dim=0)),
        Resize(SEED_SHAPE),
        CastToType(torch.float16),
    ])


def _monai_runner(folders: list[Path], work: Path, via_dcm2niix: bool):
    import numpy as np
    from monai.data import NibabelReader, PydicomReader
    from monai.transforms import LoadImage

    tail = _seed_tail()
    out = work / "out"
    if via_dcm2niix:
        exe = shutil.which("dcm2niix", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if exe is None:
            raise SystemExit("dcm2niix not found (pip install dcm2niix)")
        load = LoadImage(reader=NibabelReader(), image_only=True)
    else:
        load = LoadImage(reader=PydicomReader(), image_only=True)

    def prepare() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)

    def run() -> int:
        for i, folder in enumerate(folders):
            source = folder
            if via_dcm2niix:
                nii = out / f"nii{i}"
                nii.mkdir()
                subprocess.run([exe, "-z", "n", "-b", "n", "-f", "series", "-o", str(nii), str(folder)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                found = sorted(nii.glob("*.nii"))
                if len(found) != 1:
                    raise RuntimeError(f"dcm2niix wrote {len(found)} NIfTI files for {folder}")
                source = found[0]
            volume = tail(load(source))
            np.save(out / f"{i}.npy", volume.numpy())
        return len(folders)

    return prepare, run


def _headct_runner(src: Path, work: Path, workers: int):
    from rich.console import Console

    from headct.config import IngestConfig
    from headct.data.ingest import ingest

    cfg = IngestConfig(src=src, dest=work / "store", labels=None, labels_format="none", patient_key="dicom",
                       workers=workers, linkage=work / "private" / "linkage.csv",
                       report_dir=work / "reports")

    def prepare() -> None:
        for folder in (cfg.dest, work / "private"):
            shutil.rmtree(folder, ignore_errors=True)

    def run() -> int:
        return int(ingest(cfg, work, Console(quiet=True)).summary["accepted"])

    return prepare, run


def worker(methods: list[str], src: Path, work: Path) -> None:
    """Some methods of one family in this process: answer `run <method>` lines with a JSON timing line."""
    import torch

    torch.set_num_threads(1)
    folders = series_folders(src)
    runners = {}
    for method in methods:
        scratch = work / method
        scratch.mkdir(parents=True, exist_ok=True)
        if method.startswith("headct-w"):
            runners[method] = _headct_runner(src, scratch, int(method.removeprefix("headct-w")))
        else:
            runners[method] = _monai_runner(folders, scratch, via_dcm2niix=method == "dcm2niix-monai")
    print(json.dumps({"ready": methods}), flush=True)
    for line in sys.stdin:
        command, _, method = line.strip().partition(" ")
        if command != "run":
            break
        prepare, run = runners[method]
        prepare()
        start, cpu = time.perf_counter(), time.process_time()
        done = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "series": done}), flush=True)


class Worker:
    """A worker process for one family of methods (headct's worker counts share one; the MONAI chains another),
    so each library is imported once, and never in the other family's process."""

    def __init__(self, methods: list[str], src: Path, work: Path) -> None:
        env = {**os.environ, **THREAD_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
            "PYTHONPATH")]))}
        self.method = ",".join(methods)
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "worker.log"  # the worker's stderr (library warnings, progress), shown on failure
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", self.method, "--worker-src", str(src),
                 "--worker-work", str(work)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=work,
            )

    def ready(self) -> None:
        self._expect("ready")

    def _expect(self, key: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"{self.method}: worker exited ({self.proc.wait()}) before answering:\n{tail}")
        reply = json.loads(line)
        if key not in reply:
            raise SystemExit(f"{self.method}: unexpected reply {line!r}")
        return reply

    def run(self, method: str) -> dict:
        self.proc.stdin.write(f"run {method}\n")
        self.proc.stdin.flush()
        return self._expect("seconds")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------------------ driver
LABELS = {"monai-pydicom": "MONAI + PydicomReader (seed)", "dcm2niix-monai": "dcm2niix + MONAI tail"}


def label(method: str) -> str:
    return LABELS.get(method) or f"headct ingest, {method.removeprefix('headct-w')} worker(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("synth", "real"), default="synth")
    parser.add_argument("--series", type=int, default=8, help="number of DICOM series (studies)")
    parser.add_argument("--matrix", type=int, default=512, help="synthetic in-plane pixels (rows = columns)")
    parser.add_argument("--slice-mm", type=float, default=1.25, help="synthetic slice thickness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="1,2", help="headct worker counts, comma-separated")
    parser.add_argument("--peers", default="monai-pydicom,dcm2niix-monai",
                        help="comma-separated subset of monai-pydicom, dcm2niix-monai (empty: none)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over the whole set per method")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method (minimum reported)")
    parser.add_argument("--disk-probe-mb", type=int, default=512, help="size of the disk bandwidth probe file")
    parser.add_argument("--data", type=Path, default=REPO / "build" / "bench-ingest", help="inputs and scratch")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-ingest" / "ingest.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker.split(","), args.worker_src, args.worker_work)
        return
    os.environ.update(THREAD_ENV)
    command = shlex.join(["python", *sys.argv])

    args.data = args.data.resolve()
    args.data.mkdir(parents=True, exist_ok=True)
    src, folders = prepare_inputs(args)
    facts = input_facts(folders)
    files = dicom_files(folders)
    n = facts["series"]
    print(f"inputs: {n} series, {facts['files']} files, {facts['bytes'] / 1e6:.1f} MB, "
          f"{facts['rows']}x{facts['columns']}, {facts['slices_per_series']['mean']:.0f} slices/series", flush=True)

    load = {"start": os.getloadavg()}
    disk = disk_read_mb_s(args.data, args.disk_probe_mb)
    cold = cold_read_mb_s(files)
    decodes = [decode_seconds(files)]
    mb_per_series = facts["bytes"] / 1e6 / n
    limits = {"disk_sequential_MB_s": disk, "disk_series_per_s": disk / mb_per_series,
              "input_cold_read_MB_s": cold, "input_cold_read_series_per_s": cold / mb_per_series}

    methods = [f"headct-w{int(w)}" for w in args.workers.split(",") if w.strip()]
    counts = [int(m.removeprefix("headct-w")) for m in methods if m != "headct-w1"]
    ceilings = {str(k): [cpu_scaling_ceiling(k)] for k in counts}
    methods += [m.strip() for m in args.peers.split(",") if m.strip()]
    unknown = [m for m in methods if not m.startswith("headct-w") and m not in LABELS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {sorted(LABELS)}")
    families = {"headct": [m for m in methods if m.startswith("headct")],
                "monai": [m for m in methods if not m.startswith("headct")]}
    workers, runs, cpus = {}, {m: [] for m in methods}, {m: [] for m in methods}
    try:
        for family, members in families.items():  # start-up (imports) is not timed; both start together
            if members:
                worker_ = Worker(members, src, args.data / "work" / family)
                workers.update({m: worker_ for m in members})
        for w in set(workers.values()):
            w.ready()
        for _ in range(args.warmup):
            for method in methods:
                workers[method].run(method)
        for _ in range(args.repeats):
            for method in methods:  # alternate: background load hurts all methods alike
                reply = workers[method].run(method)
                if reply["series"] != n:
                    raise SystemExit(f"{method} finished {reply['series']} of {n} series")
                runs[method].append(reply["seconds"])
                cpus[method].append(reply["cpu_seconds"])
            decodes.append(decode_seconds(files, warm=False))  # the limit, measured as often as the methods
    finally:
        for w in set(workers.values()):
            w.close()
    for k in counts:  # the ceiling again at the end: the higher one is the one headct is held to
        ceilings[str(k)].append(cpu_scaling_ceiling(k))
    load["end"] = os.getloadavg()
    decode = min(wall for wall, _ in decodes)
    limits.update({"decode_seconds": decode, "decode_seconds_all": [wall for wall, _ in decodes],
                   "decode_cpu_seconds": min(cpu for _, cpu in decodes), "decode_series_per_s": n / decode,
                   "cpu_scaling_ceiling": {k: max(v) for k, v in ceilings.items()},
                   "cpu_scaling_ceiling_all": ceilings})

    # cpu_seconds: the CPU time of the process running the method (for headct with k > 1 workers: the parent only,
    # i.e. its serial part and the pool's result handling); on a shared machine CPU time is the steadier figure
    results = {m: {"label": label(m), "seconds_min": min(t), "seconds_all": t, "series_per_s": n / min(t),
                   "cpu_seconds_min": min(cpus[m]), "cpu_seconds_all": cpus[m]} for m, t in runs.items()}
    base = results.get("headct-w1")
    ratios = {m: r["seconds_min"] / base["seconds_min"] for m, r in results.items()} if base else {}
    scaling = {m.removeprefix("headct-w"): 1.0 / r for m, r in ratios.items() if m.startswith("headct-w")}

    report = {
        "command": command, "inputs": {"source": args.source, **facts},
        "threads_per_worker": 1, "warmup": args.warmup, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(), "results": results, "time_over_headct_w1": ratios,
        "headct_speedup_by_workers": scaling, "limits": limits, "load_average_1_5_15_min": load,
        "targets": targets(ratios, base, limits, scaling),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report, args.out)


# issue 16's targets: per worker >= 10x the seed's chain and within 2x of the decoding limit; k workers >= 0.85 of
# what k processes of pure CPU work get on the machine at the same time
SEED_CHAIN_AT_LEAST, DECODE_AT_MOST, SCALING_SHARE_AT_LEAST = 10.0, 2.0, 0.85


def targets(ratios: dict, base: dict | None, limits: dict, scaling: dict) -> dict:
    """The three figures issue 16 is judged by, each with its target and whether it is met (None: not measured)."""
    seed = ratios.get("monai-pydicom")
    decode = base["seconds_min"] / limits["decode_seconds"] if base else None
    cpu = base["cpu_seconds_min"] / limits["decode_cpu_seconds"] if base else None
    found = {
        "seed_chain": {"monai_pydicom_time_over_headct_w1": seed, "at_least": SEED_CHAIN_AT_LEAST,
                       "met": None if seed is None else seed >= SEED_CHAIN_AT_LEAST},
        "decoding_limit": {"headct_w1_time_over_decode": decode, "at_most": DECODE_AT_MOST,
                           "met": None if decode is None else decode <= DECODE_AT_MOST,
                           "headct_w1_cpu_over_decode_cpu": cpu},  # the same ratio in CPU time (load-steady)
        "scaling": {},
    }
    for k, ceiling in limits["cpu_scaling_ceiling"].items():
        if k in scaling:
            share = scaling[k] / ceiling
            found["scaling"][k] = {"speedup": scaling[k], "ceiling": ceiling, "share_of_ceiling": share,
                                   "at_least": SCALING_SHARE_AT_LEAST, "met": share >= SCALING_SHARE_AT_LEAST}
    return found


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("headct", "torch", "monai", "pydicom", "nibabel", "scipy", "numpy", "dcm2niix"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _print_table(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    inputs, n = report["inputs"], report["inputs"]["series"]
    title = (f"ingest: {n} series of {inputs['rows']}x{inputs['columns']}x~{inputs['slices_per_series']['mean']:.0f}"
             f" ({inputs['bytes'] / 1e6:.0f} MB), 1 thread per worker, min of {report['repeats']} runs after "
             f"{report['warmup']} warm-up")
    table = Table(title=title)
    for name, justify in (("method", "left"), ("best s", "right"), ("CPU s", "right"), ("series/s", "right"),
                          ("time / headct 1 worker", "right")):
        table.add_column(name, justify=justify)
    base = report["results"].get("headct-w1")
    for r in report["results"].values():
        ratio = f"{r['seconds_min'] / base['seconds_min']:.2f}x" if base else "-"
        table.add_row(r["label"], f"{r['seconds_min']:.2f}", f"{r['cpu_seconds_min']:.2f}", f"{r['series_per_s']:.3f}",
                      ratio)
    lim = report["limits"]
    table.add_section()
    table.add_row(f"reading limit: disk {lim['disk_sequential_MB_s']:.0f} MB/s sequential", "", "",
                  f"{lim['disk_series_per_s']:.2f}", "")
    table.add_row(f"reading limit: these files cold, {lim['input_cold_read_MB_s']:.0f} MB/s", "", "",
                  f"{lim['input_cold_read_series_per_s']:.2f}", "")
    table.add_row("decoding limit: pydicom read + decode + rescale", f"{lim['decode_seconds']:.2f}",
                  f"{lim['decode_cpu_seconds']:.2f}",
                  f"{lim['decode_series_per_s']:.3f}", "")
    console = Console()
    console.print(table)
    goal = report["targets"]

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    seed, decode = goal["seed_chain"], goal["decoding_limit"]
    if seed["met"] is not None:
        console.print(f"seed's chain: MONAI + pydicom takes {seed['monai_pydicom_time_over_headct_w1']:.2f}x "
                      f"headct's time at 1 worker (target >= {SEED_CHAIN_AT_LEAST:g}x) -> {verdict(seed['met'])}")
    if decode["met"] is not None:
        console.print(f"decoding limit: headct at 1 worker takes {decode['headct_w1_time_over_decode']:.2f}x "
                      f"pydicom's read + decode + rescale (target <= {DECODE_AT_MOST:g}x) -> {verdict(decode['met'])}"
                      f"; in CPU time {decode['headct_w1_cpu_over_decode_cpu']:.2f}x")
    for k, found in goal["scaling"].items():
        console.print(f"scaling: {k} workers give {found['speedup']:.2f}x the series/s of 1 worker; {k} processes "
                      f"of pure CPU work get {found['ceiling']:.2f}x here now ({os.cpu_count()} CPUs, shared): "
                      f"{found['share_of_ceiling']:.2f} of that (target >= {SCALING_SHARE_AT_LEAST:g}) -> "
                      f"{verdict(found['met'])}")
    load = report["load_average_1_5_15_min"]
    console.print(f"load average (1, 5, 15 min) at the start {tuple(round(v, 2) for v in load['start'])}, at the end "
                  f"{tuple(round(v, 2) for v in load['end'])}")
    console.print(f"command: {report['command']}\nJSON: {out}")


if __name__ == "__main__":
    main()
