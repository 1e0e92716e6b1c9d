"""Training-step speed: headct's ViT3D vs MONAI's ViT in the same configuration, side by side, on the CPU.

Same width/depth/heads/MLP, patch, grid, no qkv bias, 3 input channels; MONAI with its SDPA switch on
(`use_flash_attention` on every block's attention; `save_attn` off) and no classification head (so no Tanh).
One step = forward + mean-square loss on the output tokens + backward + AdamW step. The two models alternate
step by step after a warm-up, and the minimum of the timed steps is reported, so background load hurts both alike.
headct's encoder carries one more token (CLS: 513 vs 512 at 96^3 / 12).

Run: .venv/bin/python benchmarks/train_step.py            (ViT-B/12 at 96^3, batch 2, 2 threads)
     .venv/bin/python benchmarks/train_step.py --size tiny --img 64 --patch 16 --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch

from headct.models.vit import build_encoder

SIZES = {"tiny": (192, 6, 3), "small": (384, 12, 6), "base": (768, 12, 12)}  # width, depth, heads


def monai_vit(size: str, img: int, patch: int) -> torch.nn.Module:
    from monai.networks.nets import ViT

    width, depth, heads = SIZES[size]
    model = ViT(
        in_channels=3, img_size=img, patch_size=patch, hidden_size=width, mlp_dim=4 * width, num_layers=depth,
        num_heads=heads, proj_type="conv", pos_embed_type="sincos", classification=False, qkv_bias=False,
        save_attn=False,
    )
    for block in model.blocks:  # MONAI's SDPA switch (torch scaled_dot_product_attention)
        block.attn.use_flash_attention = True
    return model


def step_fn(model: torch.nn.Module, tokens: callable, batch: torch.Tensor) -> callable:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = tokens(batch).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--img", type=int, default=96)
    parser.add_argument("--patch", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = build_encoder({"name": args.size, "img_size": [args.img] * 3, "patch_size": args.patch, "in_chans": 3,
                          "qkv_bias": False})
    theirs = monai_vit(args.size, args.img, args.patch)
    batch = torch.randn(args.batch, 3, args.img, args.img, args.img)
    runs = {
        "headct ViT3D": (ours, step_fn(ours, ours.forward_features, batch)),
        "MONAI ViT (SDPA)": (theirs, step_fn(theirs, lambda x: theirs(x)[0], batch)),
    }
    for _, step in runs.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (_, step) in runs.items():
            times[name].append(step())

    print(f"torch {torch.__version__}, {args.threads} threads, size {args.size}, {args.img}^3, patch {args.patch}, "
          f"batch {args.batch}, min of {args.repeats} steps after {args.warmup} warm-up")
    ours_best = min(times["headct ViT3D"])
    print(f"{'model':<18} {'params (M)':>11} {'step (ms)':>10} {'volumes/s':>10} {'time vs headct':>15}")
    for name, (model, _) in runs.items():
        best = min(times[name])
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"{name:<18} {params:>11.2f} {best * 1e3:>10.1f} {args.batch / best:>10.2f} {best / ours_best:>14.2f}x")


if __name__ == "__main__":
    main()
