"""Lever study on the tuning seed (issue 9): time-boxed self-supervised pre-training variants, probed on val.

Exploration, not the benchmark: it reads an evidence workspace that `make evidence SEED=N` (a tuning seed, never
11 or 12) left in build/evidence/seed-N, holds its volumes in memory, pre-trains one variant for a fixed wall time
on train + pool (never val or test), and every `--every` minutes probes the encoder's frozen features on the
150 labelled train scans with a logistic regression (C in {0.001, 0.01, 0.1, 1}), printing the best val AUROC
per reported label. Step 0 is the variant's own random init (the twin). Val only: choices are made here, results
are measured by `make evidence` on the declared seeds.

Variants:
    vit-dino the project's DINO pretext (headct.train.pretext.DinoTask) at its defaults; teacher CLS/mean/max.
    vit-mae  the project's MAE (headct.models.mae) on ViT-tiny, voxel targets (optionally per-patch normalised) or
             `--target hist`: each masked patch's log HU histogram (MaskFeat-style hand-made target, 5 HU bins from
             -20 HU read from the subdural window). Features: CLS, mean and max of the last block's patch tokens.
    residual the reconstruction-residual read-outs of a `cnn-mim --save` checkpoint vs its random init (the lever
             that worked; headct's `pretrain.method: mim` + `extract.pools: [residual]`).
    cnn-vicreg VICReg (Bardes et al. 2022) for the small CNN on two views of one head (flip, shift, noise, contrast).
    cnn-mim  masked restoration for the small 3D CNN (headct.models.cnn's units; SparK-like but with zeroed cubes,
             not sparse convolutions): 8^3-voxel cubes hidden at `--ratio`, a light head on strides 8 and 16
             predicts each hidden cube's voxels. Features: global max and mean of each stage ("all"), of the
             last stage ("last"), global max of each stage ("maxall").

    python benchmarks/evidence/lever_study.py cnn-mim --root build/evidence/seed-7 --minutes 15 --every 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from headct.data.windows import hu_to_windows

LABELS = ("ICH", "IPH", "MassEffect", "SDH", "SAH")  # the reported labels of params-evidence.yaml
WINDOWS = [(40, 80), (80, 200), (600, 2800)]  # the project's default windows (level, width) in HU
BLOOD_WINDOW = (60, 40)  # 40-80 HU: the optional fourth channel
C_GRID = (0.001, 0.01, 0.1, 1.0)


def load(root: Path, splits: tuple[str, ...]) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Each split's rows and its volumes (N, X, Y, Z) int16 HU, from the workspace's split files."""
    out = {}
    for split in splits:
        rows = pd.read_csv(root / f"data/splits/synth/{split}.csv")
        out[split] = (rows, np.stack([np.load(root / p) for p in rows["img_path"]]))
    return out


def windowed(hu: np.ndarray, windows: list[tuple[int, int]]) -> torch.Tensor:
    return hu_to_windows(torch.from_numpy(np.ascontiguousarray(hu)), windows)


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], np.ndarray], hu: np.ndarray, windows, batch: int = 16) -> np.ndarray:
    return np.concatenate([fn(windowed(hu[i : i + batch], windows)) for i in range(0, len(hu), batch)])


def probe(f_train: np.ndarray, train: pd.DataFrame, f_val: np.ndarray, val: pd.DataFrame) -> dict[str, float]:
    """Best val AUROC over C per label (optimistic by construction: the same val picks C), and their mean."""
    res = {}
    for label in LABELS:
        y_tr, y_va = train[label].to_numpy(), val[label].to_numpy()
        ok_tr, ok_va = ~pd.isna(y_tr), ~pd.isna(y_va)
        scaler = StandardScaler().fit(f_train[ok_tr])
        best = 0.0
        for c in C_GRID:
            clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(f_train[ok_tr]), y_tr[ok_tr].astype(int))
            scores = clf.decision_function(scaler.transform(f_val[ok_va]))
            best = max(best, roc_auc_score(y_va[ok_va].astype(int), scores))
        res[label] = round(best, 3)
    res["mean"] = round(float(np.mean([res[label] for label in LABELS])), 3)
    return res


# ------------------------------------------------------------------------------------------- cnn-mim
CNN_CHANNELS = (8, 16, 32, 64)  # headct.models.cnn.DEFAULT_CHANNELS: strides 2, 4, 8, 16


class CnnEncoder(nn.Module):
    """The small CNN's strided MONAI residual units, every stage's map returned."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        self.units = nn.ModuleList()
        for c in CNN_CHANNELS:
            self.units.append(ResidualUnit(3, in_chans, c, strides=2, subunits=2, norm="batch"))
            in_chans = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for unit in self.units:
            x = unit(x)
            maps.append(x)
        return maps


class CubeHead(nn.Module):
    """Stage 4 upsampled onto stage 3 (stride 8), mixed, then each stride-8 position predicts its 8^3 voxels per
    channel (a pixel shuffle): MAE's linear output layer, for a CNN. A full-resolution decoder ran at < 3 volumes/s."""

    def __init__(self, n_chans: int, cube: int = 8) -> None:
        super().__init__()
        self.n_chans, self.cube = n_chans, cube
        self.up = nn.ConvTranspose3d(CNN_CHANNELS[3], CNN_CHANNELS[2], 2, 2)
        self.mix = nn.Sequential(nn.Conv3d(2 * CNN_CHANNELS[2], 64, 1), nn.GELU(),
                                 nn.Conv3d(64, 64, 3, padding=1), nn.GELU())
        self.pred = nn.Conv3d(64, n_chans * cube**3, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        y = self.pred(self.mix(torch.cat([self.up(maps[3]), maps[2]], 1)))  # (B, C * p^3, gx, gy, gz)
        b, _, gx, gy, gz = y.shape
        p = self.cube
        y = y.reshape(b, self.n_chans, p, p, p, gx, gy, gz).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.n_chans, gx * p, gy * p, gz * p)


def run_cnn_mim(a: argparse.Namespace) -> None:
    windows = WINDOWS + ([BLOOD_WINDOW] if a.blood else [])
    enc, head = CnnEncoder(len(windows)), CubeHead(len(windows))

    def features(x: torch.Tensor) -> np.ndarray:
        out = []
        for m in enc(x):
            t = m.flatten(2)
            out += [t.amax(2), t.mean(2)]
        return torch.cat(out, 1).numpy()

    offsets = np.cumsum([0] + [2 * c for c in CNN_CHANNELS])

    def variants(f: np.ndarray) -> dict[str, np.ndarray]:
        return {"all": f, "last": f[:, offsets[-2]:],
                "maxall": np.concatenate([f[:, offsets[k]: offsets[k] + c] for k, c in enumerate(CNN_CHANNELS)], 1)}

    params = list(enc.parameters()) + list(head.parameters())
    if a.save:  # what `residual --checkpoint` reads: the encoder and the head, as headct's mim model names them
        import atexit

        atexit.register(lambda: torch.save({"enc": enc.state_dict(), "dec": head.state_dict()}, a.save))

    def loss_fn(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        g = x.shape[-1] // 8
        keep = torch.from_numpy(rng.random((x.shape[0], 1, g, g, g)) > a.ratio).float()
        m = F.interpolate(keep, scale_factor=8, mode="nearest")
        rec = head(enc(x * m))
        return (((rec - x) ** 2) * (1 - m)).sum() / ((1 - m).sum() * x.shape[1] + 1e-6)  # hidden voxels only

    train_loop(a, windows, [enc, head], params, features, variants, loss_fn, betas=(0.9, 0.999), clip=None)


# ------------------------------------------------------------------------------------------- cnn-vicreg
class Expander(nn.Module):
    """VICReg's expander: three linear layers to `dim`, batch norm and ReLU between."""

    def __init__(self, d_in: int, dim: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                                 nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0, cov: float = 1.0) -> torch.Tensor:
    """Bardes et al. 2022: invariance (MSE) + variance hinge at std 1 + decorrelation of the embedding's dimensions."""
    n, d = z1.shape
    loss = sim * F.mse_loss(z1, z2)
    for z in (z1, z2):
        z = z - z.mean(0)
        loss = loss + var * F.relu(1.0 - torch.sqrt(z.var(0) + 1e-4)).mean() / 2
        c = (z.T @ z) / (n - 1)
        loss = loss + cov * (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d / 2
    return loss


def run_cnn_vicreg(a: argparse.Namespace) -> None:
    """Two views of one head (left-right flip, a shift of up to 3 voxels per axis, noise, a small contrast change:
    never a crop or a mask, which could hide the finding in one view and teach the encoder to ignore it) must give
    the same pooled multi-stage features: what then tells heads apart is anatomy and findings."""
    windows = WINDOWS + ([BLOOD_WINDOW] if a.blood else [])
    enc = CnnEncoder(len(windows))
    d_in = 2 * sum(CNN_CHANNELS)
    expander = Expander(d_in)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        out = []
        for m in enc(x):
            t = m.flatten(2)
            out += [t.amax(2), t.mean(2)]
        return torch.cat(out, 1)

    def features(x: torch.Tensor) -> np.ndarray:
        return pooled(x).numpy()

    offsets = np.cumsum([0] + [2 * c for c in CNN_CHANNELS])

    def variants(f: np.ndarray) -> dict[str, np.ndarray]:
        return {"all": f, "last": f[:, offsets[-2]:],
                "maxall": np.concatenate([f[:, offsets[k]: offsets[k] + c] for k, c in enumerate(CNN_CHANNELS)], 1)}

    def view(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() < 0.5:
            x = x.flip(2)
        x = torch.roll(x, tuple(int(s) for s in rng.integers(-3, 4, 3)), dims=(2, 3, 4))
        x = x * float(rng.uniform(0.95, 1.05)) + float(rng.uniform(-0.03, 0.03))
        return x + a.noise * torch.randn_like(x)

    def loss_fn(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return vicreg(expander(pooled(view(x, rng))), expander(pooled(view(x, rng))))

    params = list(enc.parameters()) + list(expander.parameters())
    train_loop(a, windows, [enc, expander], params, features, variants, loss_fn, betas=(0.9, 0.999), clip=3.0)


# ------------------------------------------------------------------------------------------- vit-mae
def run_vit_mae(a: argparse.Namespace) -> None:
    from headct.models.mae import MAE
    from headct.models.vit import vit_tiny

    enc = vit_tiny(img_size=64, patch_size=a.patch, in_chans=len(WINDOWS))

    class HistMAE(MAE):
        """Each masked patch's log HU histogram (subdural window 80/200 -> HU; 5 HU bins from -20 HU, the last bin
        open-ended) as the target, instead of its voxels (MaskFeat's idea with a CT descriptor)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.decoder_pred = nn.Linear(self.decoder_pred.in_features, a.bins)

        def masked_target(self, patches, masking):
            rows = torch.arange(patches.shape[0])[:, None]
            p3 = self.encoder.patch_size**3
            hu = patches[rows, masking.ids_masked][..., p3 : 2 * p3] * 200.0 - 20.0
            idx = ((hu + 20.0) / 5.0).floor().clamp(0, a.bins - 1).long()
            return torch.log1p(F.one_hot(idx, a.bins).sum(-2).float()) / float(np.log1p(p3))

    mae = (HistMAE if a.target == "hist" else MAE)(enc, 0.75, norm_pix_loss=bool(a.normpix))
    d = enc.embed_dim

    def features(x: torch.Tensor) -> np.ndarray:
        t = enc.forward_features(x)
        return torch.cat([t[:, 0], t[:, 1:].mean(1), t[:, 1:].amax(1)], 1).numpy()

    def variants(f: np.ndarray) -> dict[str, np.ndarray]:
        return {"cls": f[:, :d], "mean": f[:, d: 2 * d], "max": f[:, 2 * d:], "all": f}

    def loss_fn(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return mae(x)[0]

    train_loop(a, WINDOWS, [mae], list(mae.parameters()), features, variants, loss_fn, betas=(0.9, 0.95), clip=3.0)


# ------------------------------------------------------------------------------------------- vit-dino
def run_vit_dino(a: argparse.Namespace) -> None:
    """The project's DINO pretext (headct.train.pretext.DinoTask: multi-crop, teacher EMA, schedules) at its
    config defaults; features from the teacher, whose CLS token DINO makes for linear probes."""
    from headct.config.pretrain import PretrainConfig
    from headct.models.vit import vit_tiny
    from headct.train.pretext import DinoTask

    cfg = PretrainConfig(method="dino", patch_size=a.patch, seed=a.seed)
    enc = vit_tiny(img_size=64, patch_size=a.patch, in_chans=len(WINDOWS))
    task = DinoTask(cfg, enc, torch.device("cpu"), 0, total_steps=a.steps, steps_per_epoch=max(1, 700 // a.batch))
    teacher, d = task.encoder, enc.embed_dim

    def features(x: torch.Tensor) -> np.ndarray:
        t = teacher.forward_features(x)
        return torch.cat([t[:, 0], t[:, 1:].mean(1), t[:, 1:].amax(1)], 1).numpy()

    def variants(f: np.ndarray) -> dict[str, np.ndarray]:
        return {"cls": f[:, :d], "mean": f[:, d: 2 * d], "max": f[:, 2 * d:], "all": f}

    steps = iter(range(10**9))

    def loss_fn(x: torch.Tensor, rng: np.random.Generator, hu: torch.Tensor) -> torch.Tensor:
        task.step = next(steps)
        return task.loss(task.model, hu, task.step, 0)

    params = [p for p in task.model.student.parameters() if p.requires_grad]
    train_loop(a, WINDOWS, [task.model], params, features, variants, loss_fn, betas=(0.9, 0.999), clip=3.0,
               after_backward=lambda: task.after_backward(task.step), after_update=lambda: task.after_update(task.step))


# ------------------------------------------------------------------------------------------- residual
def run_residual(a: argparse.Namespace) -> None:
    """The reconstruction-residual read-outs of a `cnn-mim --save` checkpoint against the same architecture at its
    random init (seed `--seed`): `smooth` is headct's declared read-out (MaskedRestoration.residual_features);
    `base` skips its 3^3 smoothing; `tissue` and `tissue_smooth` keep only voxels of -10..100 HU farther than 6 mm
    from bone, a hand-made anatomical mask that turns any model's residual into an intensity histogram of brain
    tissue (measured to show why the declared read-out has none)."""
    from headct.models.cnn import SmallCNN3D
    from headct.models.restoration import RESIDUAL_CHANNELS, MaskedRestoration

    data = load(a.root, ("train", "val"))
    torch.manual_seed(a.seed)
    random = MaskedRestoration(SmallCNN3D(len(WINDOWS)), a.ratio).eval()
    trained = MaskedRestoration(SmallCNN3D(len(WINDOWS)), a.ratio).eval()
    state = torch.load(a.checkpoint, weights_only=True)
    trained.encoder.load_state_dict(state["enc"], strict=True)
    trained.head.load_state_dict(state["dec"], strict=True)
    q = torch.tensor([0.5, 0.9, 0.99, 0.999])

    def stats(v: torch.Tensor) -> torch.Tensor:
        pos, neg = v.clamp(min=0), (-v).clamp(min=0)
        return torch.cat([torch.quantile(pos, q), torch.quantile(neg, q), pos.mean()[None], (v**2).mean()[None],
                          torch.stack([(pos > t).float().mean() for t in (0.05, 0.1, 0.2, 0.3)])])

    @torch.no_grad()
    def readouts(model: MaskedRestoration, hu: np.ndarray) -> dict[str, np.ndarray]:
        x = windowed(hu, WINDOWS)
        residual, seen = model.residual_map(x)
        h = torch.from_numpy(np.ascontiguousarray(hu)).float()
        bone = F.max_pool3d((h > 300).float()[:, None], 5, 1, 2)[:, 0] > 0
        tissue = (h > -10) & (h < 100) & ~bone & seen
        r = residual[:, list(RESIDUAL_CHANNELS)]
        rs = F.avg_pool3d(r, 3, 1, 1)
        out = {"base": [], "smooth": [], "tissue": [], "tissue_smooth": []}
        for b in range(len(hu)):
            for name, maps, where in (("base", r, seen), ("smooth", rs, seen), ("tissue", r, tissue),
                                      ("tissue_smooth", rs, tissue)):
                out[name].append(torch.cat([stats(maps[b, c][where[b]]) for c in range(maps.shape[1])]))
        return {k: torch.stack(v).numpy() for k, v in out.items()}

    for arm, model in (("random init", random), ("trained", trained)):
        f = {}
        for split in ("train", "val"):
            hu = data[split][1]
            parts = [readouts(model, hu[i : i + 10]) for i in range(0, len(hu), 10)]
            f[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for name in f["train"]:
            print(arm, name, probe(f["train"][name], data["train"][0], f["val"][name], data["val"][0]), flush=True)


# ------------------------------------------------------------------------------------------- shared loop
def train_loop(a, windows, modules, params, features, variants, loss_fn, betas, clip,
               after_backward=None, after_update=None) -> None:
    data = load(a.root, ("train", "val", "pool"))
    pool = np.concatenate([data["train"][1], data["pool"][1]])  # pre-training sees train + pool, never val/test
    print(f"pre-training volumes {len(pool)}", flush=True)

    def evaluate(tag: str) -> None:
        for m in modules:
            m.eval()
        f_tr, f_va = (extract(features, data[s][1], windows) for s in ("train", "val"))
        v_tr, v_va = variants(f_tr), variants(f_va)
        for name in v_tr:
            print(tag, name, probe(v_tr[name], data["train"][0], v_va[name], data["val"][0]), flush=True)
        for m in modules:
            m.train()

    evaluate("step0")
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05, betas=betas)
    rng = np.random.default_rng(a.seed)
    t0, step, next_eval = time.time(), 0, a.every * 60
    while time.time() - t0 < a.minutes * 60:
        hu = pool[rng.choice(len(pool), a.batch, replace=False)]
        if rng.random() < 0.5:
            hu = hu[:, ::-1]  # left-right flip
        if a.variant == "vit-dino":  # DINO crops and windows the HU batch itself
            loss = loss_fn(None, rng, torch.from_numpy(np.ascontiguousarray(hu)))
        else:
            loss = loss_fn(windowed(hu, windows), rng)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        opt.zero_grad()
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(params, clip)
        if after_backward is not None:
            after_backward()
        opt.step()
        if after_update is not None:
            after_update()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {step * a.batch / (time.time() - t0):.1f} vol/s", flush=True)
        if time.time() - t0 > next_eval:
            evaluate(f"step{step}")
            next_eval += a.every * 60
    evaluate(f"final{step}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", choices=["cnn-mim", "cnn-vicreg", "vit-mae", "vit-dino", "residual"])
    ap.add_argument("--root", type=Path, required=True, help="an evidence workspace of a tuning seed")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall time of pre-training")
    ap.add_argument("--every", type=float, default=5.0, help="minutes between val probes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="peak lr (cnn-mim 2e-3, vit-mae 1e-3)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (cnn-mim 50, vit-mae 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.6, help="cnn-mim: share of 8^3 cubes hidden")
    ap.add_argument("--save", type=Path, default=None, help="cnn-mim: write the encoder and head here at the end")
    ap.add_argument("--checkpoint", type=Path, default=None, help="residual: a `cnn-mim --save` file")
    ap.add_argument("--blood", action="store_true", help="cnn-mim: add a 40-80 HU window channel")
    ap.add_argument("--noise", type=float, default=0.03, help="cnn-vicreg: Gaussian noise per view (window units)")
    ap.add_argument("--patch", type=int, default=8, help="vit-mae: patch edge (voxels)")
    ap.add_argument("--normpix", action="store_true", help="vit-mae: per-patch normalised voxel targets")
    ap.add_argument("--target", choices=["pixels", "hist"], default="pixels", help="vit-mae: what masked patches predict")
    ap.add_argument("--bins", type=int, default=25, help="vit-mae --target hist: 5 HU bins from -20 HU")
    ap.add_argument("--steps", type=int, default=1500, help="vit-dino: the schedules' length in steps")
    a = ap.parse_args()
    cnn = a.variant.startswith("cnn")
    a.lr = a.lr if a.lr is not None else (2e-3 if cnn else 1e-3)
    a.warmup = a.warmup if a.warmup is not None else (50 if cnn else 100)
    print(vars(a), flush=True)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)  # before the models are built: the seed fixes the random init (step 0's twin)
    {"cnn-mim": run_cnn_mim, "cnn-vicreg": run_cnn_vicreg, "vit-mae": run_vit_mae, "vit-dino": run_vit_dino, "residual": run_residual}[a.variant](a)


if __name__ == "__main__":
    main()
