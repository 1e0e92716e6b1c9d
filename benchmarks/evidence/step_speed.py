"""Training-step speed of the evidence profile's models, each interleaved with the reference step of
benchmarks/README.md (`train_step.py --size tiny --img 64 --patch 16 --batch 8`: ViT-tiny/16 forward_features, mean
square of the tokens, backward, AdamW), so the reference shows how busy the machine was (106.7 ms when recorded idle).

One step = forward + loss + backward + AdamW on random input of 3 window channels; the models alternate step by step
and the minimum of the timed steps is reported (background load hurts each alike). Models: mae8 / mae16 (MAE tiny,
mask 0.75), vit8 / vit16 (ViT-tiny classifier, mean pooling, 15 outputs), resnet10 / resnet18 (MONAI 3D ResNet
classifier, 15 outputs).

Run: .venv/bin/python benchmarks/evidence/step_speed.py mae8 vit8 resnet18      (64^3, batch 8, 2 threads)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from headct.models.heads import Classifier
from headct.models.mae import MAE
from headct.models.resnet import ResNetBackbone
from headct.models.vit import build_encoder

MODELS = ("mae8", "mae16", "vit8", "vit16", "resnet10", "resnet18")


def vit(img: int, patch: int, **kw) -> torch.nn.Module:
    return build_encoder({"name": "tiny", "img_size": [img] * 3, "patch_size": patch, "in_chans": 3, **kw})


def model_and_loss(name: str, img: int) -> tuple[torch.nn.Module, Callable]:
    if name == "reference":
        return vit(img, 16, qkv_bias=False), lambda m, x: m.forward_features(x).float().pow(2).mean()
    if name.startswith("mae"):
        return MAE(vit(img, int(name[3:]))), lambda m, x: m(x)[0]
    backbone = vit(img, int(name[3:])) if name.startswith("vit") else ResNetBackbone(name, 3)
    return Classifier(backbone, "mean", 15), lambda m, x: m(x).square().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=MODELS)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, args.img)
    steps = {}
    for name in ("reference", *args.models):
        model, loss_of = model_and_loss(name, args.img)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, loss_of=loss_of, optimizer=optimizer) -> float:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, x).backward()
            optimizer.step()
            return time.perf_counter() - start

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.repeats + 1):  # the first round is a warm-up
        for name, step in steps.items():
            seconds = step()
            if i:
                times[name].append(seconds)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.img}^3, batch {args.batch}, "
          f"min of {args.repeats} steps after 1 warm-up")
    reference = min(times["reference"])
    for name, seconds in times.items():
        best = min(seconds)
        print(f"{name:<10} step {best * 1e3:9.1f} ms  {args.batch / best:8.2f} volumes/s  "
              f"{best / reference:7.2f}x the reference")


if __name__ == "__main__":
    main()
