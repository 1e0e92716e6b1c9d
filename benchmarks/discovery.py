"""Header discovery and the labels CSV at the scale of a real download: RSNA 2019's flat folder of one slice per file.

Input (written once, cached under --data, reused when present): a flat folder `stage_2_train/` of --files small
slices (--matrix^2 pixels, 12 bits stored, written by pydicom like the challenge's: `ID_<hex>.dcm`, anonymised
`ID_<hex>` identifiers, exams of --slices-per-exam slices) and its `stage_2_train.csv` (six `ID_<hex>_<subtype>,
<0|1>` rows per slice).

Measured, each in a fresh child process (so one measurement's memory never counts in another's):
  discovery   what `headct ingest` does before QC, on one worker: `list_files` (the walk), `read_headers` in the
              chunks ingest hands its workers, `drop_repeated_instances`, `group_series`. Files/s; peak resident
              memory (getrusage ru_maxrss) over the interpreter's baseline; the bytes Python holds per file once
              discovery is done (tracemalloc, on the first --traced files: tracing slows it, so it is not timed).
  labels      `read_rsna` (pandas, --chunk-rows rows a chunk): rows/s and peak resident memory over the baseline.
The memory bound this states: discovery holds the file list and one SliceHeader per slice (bytes per file,
measured), nothing per file beyond; a worker parses one header at a time. So a 750,000-file download needs about
750,000 x (bytes per file) for discovery, whatever the files' pixel size.

Run: .venv/bin/python benchmarks/discovery.py                      (100,000 files; writing them takes minutes once)
     .venv/bin/python benchmarks/discovery.py --files 300 --traced 100 --data build/tiny  (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


# ------------------------------------------------------------------------------------------------------ inputs
def _hex(rng: random.Random, digits: int) -> str:
    return "ID_" + "".join(rng.choice("0123456789abcdef") for _ in range(digits))


_PLACEHOLDERS = {"sop": "ID_aaaaaaaaa", "study": "ID_bbbbbbbbbb", "series": "ID_cccccccccc", "patient": "ID_dddddddd",
                 "z": "-7777.5"}  # fixed-width values of the template file, replaced per file (same lengths)


def _template(matrix: int) -> bytes:
    """One slice written by pydicom (12 bits stored, a disc of brain in a ring of bone in air), placeholders in."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    yy, xx = np.mgrid[:matrix, :matrix] - (matrix - 1) / 2
    radius = np.hypot(xx, yy) / (matrix / 2)
    hu = np.where(radius < 0.6, 35, np.where(radius < 0.75, 1000, -1000))
    warnings.simplefilter("ignore", UserWarning)  # `ID_...` is not a valid UI value: pydicom warns, and writes it
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, _PLACEHOLDERS["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, _PLACEHOLDERS["sop"], "CT"
    ds.PatientID, ds.StudyInstanceUID = _PLACEHOLDERS["patient"], _PLACEHOLDERS["study"]
    ds.SeriesInstanceUID = _PLACEHOLDERS["series"]
    ds.ImagePositionPatient = ["-115.0", "-115.0", _PLACEHOLDERS["z"]]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [round(230.0 / matrix, 4)] * 2
    ds.Rows = ds.Columns = matrix
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024.0, 1.0, 30, 80
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_download(root: Path, files: int, matrix: int, per_exam: int, seed: int = 0) -> Path:
    """Write `root/stage_2_train/` and `root/stage_2_train.csv` unless a complete copy with these sizes exists.
    One file is written by pydicom; the others are its bytes with the identifiers and position replaced by
    values of the same length (writing 100,000 files through pydicom would take longer than reading them)."""
    done = root / "complete.json"
    wanted = {"files": files, "matrix": matrix, "per_exam": per_exam, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == wanted:
        return root
    flat = root / "stage_2_train"
    flat.mkdir(parents=True, exist_ok=True)
    for old in flat.glob("*.dcm"):
        old.unlink()
    with warnings.catch_warnings():
        template = _template(matrix)
    assert all(template.count(v.encode()) >= 1 for v in _PLACEHOLDERS.values())
    rng = random.Random(seed)
    rows = []
    for k in range(files):
        if k % per_exam == 0:
            exam = {"study": _hex(rng, 10), "series": _hex(rng, 10), "patient": _hex(rng, 8)}
        sop = _hex(rng, 9)
        data = template
        for key, value in {**exam, "sop": sop, "z": f"{5.0 * (k % per_exam):7.1f}"}.items():
            data = data.replace(_PLACEHOLDERS[key].encode(), value.encode())
        (flat / f"{sop}.dcm").write_bytes(data)
        rows += [f"{sop}_{subtype},{int(rng.random() < 0.02)}\n" for subtype in SUBTYPES]
        if (k + 1) % 20_000 == 0:
            print(f"  written {k + 1} of {files} files", flush=True)
    (root / "stage_2_train.csv").write_text("ID,Label\n" + "".join(rows))
    done.write_text(json.dumps(wanted))
    return root


# ------------------------------------------------------------------------------------------------ measurements
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): unlike wall time, not stretched by other jobs' load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_discovery(root: Path, traced: int) -> dict:
    import tracemalloc

    from headct.data import discovery as disc

    flat = root / "stage_2_train"
    files = sorted(flat.glob("*.dcm"))
    disc.read_headers(files[:1], flat)  # imports and first-use caches, outside the figures
    del files
    baseline = _rss_mb()

    def discover(files: list[Path]) -> tuple[list, list]:
        size = 512  # ingest's chunk size for a large source (ingest._discover)
        found = disc.Discovery([], [], 0)
        for i in range(0, len(files), size):
            part = disc.read_headers(files[i: i + size], flat)
            found.headers.extend(part.headers)
            found.bad_files.extend(part.bad_files)
        headers, _ = disc.drop_repeated_instances(sorted(found.headers, key=lambda h: (str(h.path), h.frame)))
        return headers, disc.group_series(headers)

    started, cpu = time.perf_counter(), _cpu_s()
    files = disc.list_files(flat).files
    listed = time.perf_counter() - started
    headers, series = discover(files)
    seconds, cpu = time.perf_counter() - started, _cpu_s() - cpu
    peak = _rss_mb()
    n, n_series, n_headers = len(files), len(series), len(headers)
    del headers, series

    subset = files[:traced]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = (list(subset), *discover(subset))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(kept[1]) == len(subset)
    return {"files": n, "headers": n_headers, "series": n_series, "seconds": round(seconds, 2), "list_seconds": round(listed, 2),
            "files_per_s": round(n / seconds, 1), "cpu_seconds": round(cpu, 2),
            "files_per_cpu_s": round(n / max(cpu, 1e-9), 1), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1), "peak_over_baseline_mb": round(peak - baseline, 1),
            "traced_files": len(subset), "bytes_per_file_held": round(held / max(1, len(subset)))}


def measure_labels(root: Path, chunk_rows: int) -> dict:
    from headct.data.label_sources.rsna2019 import read_rsna

    baseline = _rss_mb()
    started, cpu = time.perf_counter(), _cpu_s()
    rows = read_rsna(root / "stage_2_train.csv", chunk_rows=chunk_rows)
    seconds, cpu = time.perf_counter() - started, _cpu_s() - cpu
    with open(root / "stage_2_train.csv") as fh:
        n = sum(1 for _ in fh) - 1
    peak = _rss_mb()
    return {"rows": n, "slices": len(rows.table), "chunk_rows": chunk_rows, "seconds": round(seconds, 2),
            "rows_per_s": round(n / seconds, 1), "cpu_seconds": round(cpu, 2),
            "rows_per_cpu_s": round(n / max(cpu, 1e-9), 1), "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
            "peak_over_baseline_mb": round(peak - baseline, 1),
            "csv_mb": round((root / "stage_2_train.csv").stat().st_size / 2**20, 1)}


def child(what: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh interpreter (its own peak memory)."""
    cmd = [sys.executable, __file__, "--measure", what, "--data", str(args.data), "--traced", str(args.traced),
           "--chunk-rows", str(args.chunk_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"{what} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--matrix", type=int, default=32)
    parser.add_argument("--slices-per-exam", type=int, default=40)
    parser.add_argument("--traced", type=int, default=10_000, help="files traced for the bytes held per file")
    parser.add_argument("--chunk-rows", type=int, default=500_000, help="rows per chunk of the labels CSV")
    parser.add_argument("--data", type=Path, default=REPO / "build" / "bench-discovery")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: <data>/discovery.json)")
    parser.add_argument("--measure", choices=["discovery", "labels"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "discovery":
        print(json.dumps(measure_discovery(args.data, args.traced)))
        return
    if args.measure == "labels":
        print(json.dumps(measure_labels(args.data, args.chunk_rows)))
        return
    print(f"inputs: {args.files} files of {args.matrix}x{args.matrix} under {args.data}", flush=True)
    make_download(args.data, args.files, args.matrix, args.slices_per_exam)
    load = [round(v, 2) for v in os.getloadavg()]
    result = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count()},
              "discovery": child("discovery", args), "labels": child("labels", args)}
    result["load_average_1_5_15_min"] = {"start": load, "end": [round(v, 2) for v in os.getloadavg()]}
    d, lab = result["discovery"], result["labels"]
    print(f"discovery: {d['files']} files in {d['seconds']} s ({d['files_per_s']} files/s, one worker; "
          f"{d['files_per_cpu_s']} per CPU second); peak "
          f"{d['peak_rss_mb']} MB resident ({d['peak_over_baseline_mb']} MB over the interpreter); "
          f"{d['bytes_per_file_held']} bytes held per file")
    print(f"labels: {lab['rows']} rows ({lab['csv_mb']} MB) in {lab['seconds']} s ({lab['rows_per_s']} rows/s; "
          f"{lab['rows_per_cpu_s']} per CPU second); peak "
          f"{lab['peak_rss_mb']} MB resident ({lab['peak_over_baseline_mb']} MB over the interpreter)")
    out = args.out or args.data / "discovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
