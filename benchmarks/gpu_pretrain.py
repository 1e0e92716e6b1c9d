"""GPU pre-training throughput: ViT-B/12 at 96^3, MAE and DINO steps on in-memory int16 batches, bf16 + SDPA
(+ torch.compile), reporting volumes/s, the step-time split, peak memory and MFU.

The step is the real one of `headct pretrain`: int16 HU volumes in pinned host memory -> device (non-blocking)
-> augmentation / multi-crop and HU windows on the GPU -> forward + backward under bf16 autocast -> fused AdamW
(-> DINO: last-layer freeze and teacher EMA). With `--data memory` (default) the volumes are already in memory,
so the figure is the compute ceiling that the data path has to feed; with `--data disk` they are int16 `.npy`
files read memory-mapped, as the pre-training job reads the store, in shuffled batches through a DataLoader
(`--workers` processes, pinned memory; the job's own VolumeDataset also checks each file against the store's
manifest, which needs pydantic and pandas that the device machine lacks), and `data_wait_share` is the share of the timed steps spent waiting for the next batch (the
seed's DINO run spent 94% of its wall time there).

MAE's decoder is the MAE paper's (He et al. 2022, Table 1a/1b: 8 blocks, 512 wide, 16 heads) unless overridden.

MFU = model FLOPs per second / the card's measured bf16 matmul peak (a large square matmul timed on the same
card, so the ratio does not depend on a datasheet). Model FLOPs are counted analytically for the matmuls and
attention (2 per multiply-add; backward = 2x forward, less the patch embedding's unneeded input gradient; DINO
teacher: forward only; checked against torch's FlopCounterMode in the tests); elementwise work is not
counted, as in the PaLM/MFU convention.

Runs where the device tool places it: Python 3.12 with its own torch, no network, no pydantic/MONAI/MLflow:
it imports torch, numpy and headct's import-light modules only (checked at the end).

Run (GPU):  python benchmarks/gpu_pretrain.py --json $OUT/gpu_pretrain.json
            python benchmarks/gpu_pretrain.py --data disk --workers 8 --json $OUT/gpu_pretrain_disk.json
Smoke (CPU): python benchmarks/gpu_pretrain.py --device cpu --size tiny --img 32 --patch 16 --steps 1 --warmup 0 \
             --mae-batch 2 --dino-batch 2 --local-crops 2 --local-size 16 --no-compile
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare checkout, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from headct.data.augment import augment_hu  # noqa: E402
from headct.data.crops import multi_crop  # noqa: E402
from headct.data.windows import hu_to_windows  # noqa: E402
from headct.models.dino import DINO  # noqa: E402
from headct.models.mae import MAE  # noqa: E402
from headct.models.vit import build_encoder  # noqa: E402
from headct.train.engine import adamw, step_generator  # noqa: E402
from headct.train.schedules import teacher_momentum  # noqa: E402

WINDOWS = [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]  # brain, subdural, bone (level, width) in HU


# ------------------------------------------------------------------------------------------------ FLOPs
def blocks_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` pre-norm blocks on `tokens` tokens: qkv + proj + MLP matmuls + QK^T and AV."""
    matmul = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return depth * (matmul + attention)


def mae_flops(enc: torch.nn.Module, mae: MAE, batch: int) -> float:
    """Training FLOPs of one MAE step: 3 x forward, less the patch embedding's input gradient (never needed)."""
    n = enc.num_patches
    keep = max(1, int(round(n * (1 - mae.mask_ratio))))
    voxels = enc.arch["in_chans"] * enc.patch_size**3
    dd = mae.decoder_embed.out_features
    embed = 2 * keep * voxels * enc.embed_dim  # patch embedding of the kept patches
    fwd = embed + blocks_flops(enc.num_prefix_tokens + keep, enc.embed_dim, len(enc.blocks), enc.arch["mlp_ratio"])
    fwd += 2 * (1 + keep) * enc.embed_dim * dd
    fwd += blocks_flops(1 + n, dd, len(mae.decoder_blocks))
    fwd += 2 * (n - keep) * dd * voxels  # prediction of the masked patches only
    return (3 * fwd - embed) * batch


def dino_flops(enc: torch.nn.Module, dino: DINO, batch: int, n_global: int, global_edge: int, n_local: int,
               local_edge: int) -> float:
    """Training FLOPs of one DINO step: student forward+backward on every view, teacher forward on the globals."""
    p, d = enc.patch_size, enc.embed_dim
    voxels = enc.arch["in_chans"] * p**3
    head = sum(2 * m.in_features * m.out_features for m in dino.student.head.modules()
               if isinstance(m, torch.nn.Linear))

    def embed(edge: int) -> float:
        return 2 * (edge // p) ** 3 * voxels * d

    def view(edge: int) -> float:
        n = (edge // p) ** 3
        return embed(edge) + blocks_flops(enc.num_prefix_tokens + n, d, len(enc.blocks), enc.arch["mlp_ratio"]) + head

    student = n_global * view(global_edge) + n_local * view(local_edge)
    no_input_grad = n_global * embed(global_edge) + n_local * embed(local_edge)
    teacher = n_global * view(global_edge)
    return (3 * student - no_input_grad + teacher) * batch


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul on this device (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 30 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ data
def head_pool(n: int, edge: int, seed: int = 0) -> torch.Tensor:
    """n int16 HU volumes (edge^3): air, a skull shell, brain with noise, offset per volume; pinned on CUDA hosts."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, edge)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    vols = torch.empty(n, edge, edge, edge, dtype=torch.int16)
    for i in range(n):
        c = (torch.rand(3, generator=g) - 0.5) * 0.2
        r = ((x - c[0]) ** 2 / 0.8**2 + (y - c[1]) ** 2 / 0.9**2 + (z - c[2]) ** 2 / 0.85**2).sqrt()
        v = torch.full_like(r, -1000.0)
        v[r < 0.92] = 900.0
        v[r < 0.84] = 35.0 + 8 * torch.randn(int((r < 0.84).sum()), generator=g)
        vols[i] = v.round().to(torch.int16)
    return vols.pin_memory() if torch.cuda.is_available() else vols


class Batches:
    """Random batches from the in-memory pool, gathered into pinned buffers and copied without blocking."""

    def __init__(self, pool: torch.Tensor, batch: int, device: torch.device) -> None:
        self.pool, self.batch, self.device = pool, batch, device
        pin = device.type == "cuda"
        self.buffers = [torch.empty((batch, *pool.shape[1:]), dtype=pool.dtype, pin_memory=pin) for _ in range(2)]
        self.i = 0

    def next(self, step: int) -> torch.Tensor:
        idx = torch.randint(len(self.pool), (self.batch,), generator=step_generator(0, step, 9))
        buf = self.buffers[self.i % 2]
        self.i += 1
        torch.index_select(self.pool, 0, idx, out=buf)
        return buf.to(self.device, non_blocking=True)


class NpyVolumes(torch.utils.data.Dataset):
    """Item i -> the int16 volume of file i, read memory-mapped and copied out (the store's file format)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(np.load(self.paths[index], mmap_mode="r", allow_pickle=False)))


class DiskBatches:
    """Shuffled batches of `.npy` volumes read in DataLoader workers (pinned memory), copied without blocking;
    `wait_s` accumulates the time the step waited for data."""

    def __init__(self, folder: Path, batch: int, device: torch.device, workers: int, steps: int) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        dataset = NpyVolumes(sorted(folder.glob("*.npy")))
        sampler = RandomSampler(dataset, replacement=True, num_samples=batch * steps,
                                generator=torch.Generator().manual_seed(0))
        self.loader = iter(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                      prefetch_factor=4 if workers > 0 else None, drop_last=True))
        self.device, self.wait_s = device, 0.0

    def next(self, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        hu = next(self.loader)
        self.wait_s += time.perf_counter() - t0
        return hu.to(self.device, non_blocking=True)


def write_pool(pool: torch.Tensor, folder: Path) -> Path:
    """The in-memory pool as one int16 `.npy` per volume, the canonical store's file format."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, vol in enumerate(pool):
        np.save(folder / f"scan{i:05d}.npy", vol.numpy())
    return folder


def make_batches(args: argparse.Namespace, pool: torch.Tensor, batch: int, device: torch.device):
    if args.data == "memory":
        return Batches(pool, batch, device)
    total = args.warmup + args.steps + max(1, min(5, args.steps))  # every step measure() will ask for
    return DiskBatches(args.disk_folder, batch, device, args.workers, total)


# ------------------------------------------------------------------------------------------------ steps
def mae_runner(args: argparse.Namespace, device: torch.device, pool: torch.Tensor):
    torch.manual_seed(0)
    enc = build_encoder({"name": args.size, "img_size": args.img, "patch_size": args.patch, "in_chans": 3,
                         "qkv_bias": False})
    mae = MAE(enc, 0.75, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
              decoder_heads=args.decoder_heads).to(device)
    opt = adamw(mae, 1.5e-4, 0.05)
    model = torch.compile(mae) if args.compile else mae
    batches = make_batches(args, pool, args.mae_batch, device)

    def data(step: int) -> torch.Tensor:
        hu = augment_hu(batches.next(step), step_generator(0, step, 0), True, 5.0, 0.02)
        return hu_to_windows(hu, WINDOWS)

    def forward(x: torch.Tensor, step: int) -> torch.Tensor:
        return model(x, step_generator(0, step, 1))[0]

    def update(step: int) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return mae, data, forward, update, mae_flops(enc, mae, args.mae_batch), args.mae_batch, batches


def dino_runner(args: argparse.Namespace, device: torch.device, pool: torch.Tensor):
    torch.manual_seed(0)
    enc = build_encoder({"name": args.size, "img_size": args.img, "patch_size": args.patch, "in_chans": 3,
                         "qkv_bias": False})
    dino = DINO(enc, out_dim=args.dino_out_dim).to(device)
    opt = adamw(dino, 5e-4, 0.04)
    model = torch.compile(dino) if args.compile else dino
    batches = make_batches(args, pool, args.dino_batch, device)
    total = 10_000  # only fixes where the momentum schedule sits; irrelevant to speed

    def data(step: int) -> tuple[list, list]:
        crops = multi_crop(batches.next(step), step_generator(0, step, 0), 2, args.img, args.local_crops,
                           args.local_size, flip_lr=True, jitter_hu=5.0, jitter_scale=0.02, patch_size=args.patch)
        return ([hu_to_windows(c, WINDOWS) for c in crops.global_crops],
                [hu_to_windows(c, WINDOWS) for c in crops.local_crops])

    def forward(views: tuple[list, list], step: int) -> torch.Tensor:
        return model(views[0], views[1], 0.04)["loss"]

    def update(step: int) -> None:
        dino.cancel_last_layer_grad(epoch=1)  # past the frozen epoch: the head's last layer trains
        opt.step()
        opt.zero_grad(set_to_none=True)
        dino.update_teacher(teacher_momentum(step, total))

    flops = dino_flops(enc, dino, args.dino_batch, 2, args.img, args.local_crops, args.local_size)
    return dino, data, forward, update, flops, args.dino_batch, batches


def measure(name: str, runner, args: argparse.Namespace, device: torch.device, pool: torch.Tensor,
            peak: float) -> dict:
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    module, data, forward, update, flops, batch, batches = runner(args, device, pool)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(s: int) -> None:
        x = data(s)
        with amp:
            loss = forward(x, s)
        loss.backward()
        update(s)

    t0 = time.perf_counter()
    for s in range(args.warmup):  # includes torch.compile's tracing and autotuning
        step(s)
    sync(device)
    warmup_s = time.perf_counter() - t0

    waited_before = getattr(batches, "wait_s", 0.0)
    t0 = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        step(s)
    sync(device)
    seconds = time.perf_counter() - t0
    # Only a disk-fed run waits for data; in memory the gather is part of the step's "data" phase below.
    data_wait = getattr(batches, "wait_s", 0.0) - waited_before

    # Step-time split on a few extra steps, synchronising between phases (this pass is not in the throughput).
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    split_steps = max(1, min(5, args.steps))
    for s in range(split_steps):
        s += args.warmup + args.steps
        marks = [time.perf_counter()]
        x = data(s)
        sync(device)
        marks.append(time.perf_counter())
        with amp:
            loss = forward(x, s)
        sync(device)
        marks.append(time.perf_counter())
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        update(s)
        sync(device)
        marks.append(time.perf_counter())
        for key, a, b in zip(parts, marks, marks[1:], strict=False):
            parts[key] += (b - a) / split_steps
    total_split = sum(parts.values())
    step_s = seconds / args.steps
    result = {
        "method": name, "batch": batch, "data": args.data,
        "data_wait_share": round(data_wait / seconds, 3) if args.data == "disk" else None, "steps": args.steps, "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2), "step_ms": round(1000 * step_s, 2),
        "volumes_per_s": round(batch / step_s, 1),
        "split_ms": {k: round(1000 * v, 2) for k, v in parts.items()},
        "split_share": {k: round(v / total_split, 3) for k, v in parts.items()},
        "model_tflops_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(flops / step_s / 1e12, 2),
        "mfu": round(flops / step_s / peak, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else None,
        "loss_finite": bool(math.isfinite(loss.item())),
    }
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--img", type=int, default=96)
    parser.add_argument("--patch", type=int, default=12)
    parser.add_argument("--methods", default="mae,dino")
    parser.add_argument("--mae-batch", type=int, default=256)
    parser.add_argument("--dino-batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--dino-out-dim", type=int, default=4096)
    parser.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width (MAE paper: 512)")
    parser.add_argument("--decoder-depth", type=int, default=8, help="MAE decoder blocks (MAE paper: 8)")
    parser.add_argument("--decoder-heads", type=int, default=16, help="MAE decoder heads (MAE paper: 16)")
    parser.add_argument("--data", choices=["memory", "disk"], default="memory",
                        help="batches from an in-memory pool, or from .npy files through a DataLoader")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers with --data disk")
    parser.add_argument("--pool", type=int, default=512, help="in-memory volumes to draw batches from")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    started = time.perf_counter()
    peak = matmul_peak(device, torch.bfloat16 if args.amp else torch.float32)
    pool = head_pool(args.pool, args.img)
    scratch = tempfile.TemporaryDirectory(prefix="headct-gpu-bench-")
    args.disk_folder = write_pool(pool, Path(scratch.name)) if args.data == "disk" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.size} at {args.img}^3 patch {args.patch}; "
          f"data {args.data}; bf16 {args.amp}; compile {args.compile}; matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"({'bf16' if args.amp else 'fp32'})", flush=True)
    runners = {"mae": mae_runner, "dino": dino_runner}
    results = []
    for method in args.methods.split(","):
        results.append(measure(method, runners[method], args, device, pool, peak))
        r = results[-1]
        wait = f", waiting for data {100 * r['data_wait_share']:.1f}%" if r["data_wait_share"] is not None else ""
        print(f"{method}: {r['volumes_per_s']} volumes/s (batch {r['batch']}, {r['step_ms']} ms/step), "
              f"MFU {100 * r['mfu']:.1f}%, warm-up {r['warmup_s']} s{wait}", flush=True)

    print()
    header = f"{'method':6} {'batch':>5} {'vol/s':>9} {'ms/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}  split"
    print(header)
    for r in results:
        split = " ".join(f"{k} {100 * v:.0f}%" for k, v in r["split_share"].items())
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['method']:6} {r['batch']:>5} {r['volumes_per_s']:>9.1f} {r['step_ms']:>8.1f} "
              f"{r['achieved_tflops']:>8.1f} {100 * r['mfu']:>5.1f}% {mem:>8}  {split}")
    heavy = sorted({"pydantic", "mlflow", "monai"} & set(sys.modules))
    if heavy:
        raise SystemExit(f"imported {heavy}: the GPU benchmark must run on torch alone")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; imports: torch, numpy, headct (no pydantic/MONAI/MLflow)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "size": args.size,
                                         "data": args.data, "decoder": [args.decoder_depth, args.decoder_dim],
                                         "img": args.img, "patch": args.patch, "bf16": args.amp,
                                         "compile": args.compile, "matmul_peak_tflops": round(peak / 1e12, 1),
                                         "results": results}, indent=2))
    scratch.cleanup()


if __name__ == "__main__":
    main()
