"""DINO: multi-crop inside the head, the self-distillation model, its loss and schedules (tiny shapes, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from headct.data.crops import head_boxes, multi_crop
from headct.data.windows import hu_to_windows
from headct.models.dino import DINO, DINOHead, DINOLoss, koleo_loss
from headct.models.vit import ViT3D
from headct.train.engine import adamw, step_generator
from headct.train.schedules import dino_weight_decay, teacher_momentum, teacher_temperature

WINDOWS = [(40, 80), (600, 2800)]  # brain and bone, level/width HU: two input channels
AIR = -1000


def tiny_dino(seed: int = 0, **kwargs) -> DINO:
    torch.manual_seed(seed)
    encoder = ViT3D(img_size=32, patch_size=8, in_chans=len(WINDOWS), embed_dim=48, depth=2, num_heads=4)
    return DINO(encoder, **{"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, **kwargs})


def box_volumes(n: int = 4, size: int = 40) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Air volumes with a small box-shaped 'head' off-centre (5% of the volume): soft tissue inside bone."""
    head = (slice(6, 20), slice(14, 30), slice(10, 22))
    hu = torch.full((n, size, size, size), AIR, dtype=torch.int16)
    hu[(slice(None), *head)] = 1000
    inner = tuple(slice(s.start + 2, s.stop - 2) for s in head)
    for i in range(n):
        hu[(i, *inner)] = 20 + 10 * i
    return hu, head


def views(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    return [hu_to_windows(c, WINDOWS) for c in crops]


# ------------------------------------------------------------------------------------------------- crops
def test_head_boxes_find_the_head_not_the_padding():
    hu, head = box_volumes(2)
    hu[1] = AIR  # a blank volume falls back to the whole grid
    boxes = head_boxes(hu)
    assert boxes.shape == (2, 2, 3)
    assert boxes[0].tolist() == [[s.start for s in head], [s.stop for s in head]]
    assert boxes[1].tolist() == [[0, 0, 0], [40, 40, 40]]


def test_crops_are_taken_inside_the_head():
    hu, head = box_volumes(4)
    crops = multi_crop(hu, step_generator(0, 0), n_global=2, global_size=16, n_local=4, local_size=8,
                       global_scale=(0.02, 0.06), local_scale=(0.005, 0.02))
    lo = torch.tensor([s.start for s in head], dtype=torch.float32)
    hi = torch.tensor([s.stop for s in head], dtype=torch.float32)
    for box in crops.global_boxes + crops.local_boxes:  # (B, 2, 3) continuous voxel coordinates
        centre = box.mean(dim=1)
        assert ((centre >= lo) & (centre <= hi)).all(), "a crop centre lies outside the head box"
        assert (box[:, 0] >= 0).all() and (box[:, 1] <= 40).all(), "a crop box leaves the volume"
    for crop in crops.global_crops + crops.local_crops:
        per_crop = crop.mean(dim=(1, 2, 3))
        # a centre inside the head keeps at least an eighth of the box in the head: far above air
        assert (per_crop > AIR + 100).all(), per_crop
    # the volume itself is 95% air (mean below -900 HU), so random boxes anywhere would be mostly air
    assert hu.float().mean() < -900
    assert torch.cat([c.mean(dim=(1, 2, 3)) for c in crops.global_crops + crops.local_crops]).mean() > -600


def test_whole_volume_crop_is_the_volume_and_flip_is_left_right():
    hu, _ = box_volumes(2, size=16)
    kwargs = {"n_global": 1, "global_size": 16, "n_local": 0, "global_scale": (1.0, 1.0), "aspect": (1.0, 1.0)}
    plain = multi_crop(hu, step_generator(0, 0), flip_lr=False, **kwargs)
    assert torch.allclose(plain.global_crops[0], hu.float(), atol=1e-3)
    flipped = multi_crop(hu, step_generator(0, 0), flip_lr=True, **kwargs).global_crops[0]
    for crop, vol in zip(flipped, hu.float(), strict=True):
        assert torch.allclose(crop, vol, atol=1e-3) or torch.allclose(crop, vol.flip(0), atol=1e-3)


def test_crops_have_requested_shapes_and_are_deterministic():
    hu, _ = box_volumes(3, size=32)
    kwargs = {"n_global": 2, "global_size": 32, "n_local": 3, "local_size": (16, 16, 8), "jitter_hu": 20.0,
              "jitter_scale": 0.05, "patch_size": 8}
    a = multi_crop(hu, step_generator(7, 3), **kwargs)
    b = multi_crop(hu, step_generator(7, 3), **kwargs)
    c = multi_crop(hu, step_generator(7, 4), **kwargs)
    assert [x.shape for x in a.global_crops] == [torch.Size([3, 32, 32, 32])] * 2
    assert [x.shape for x in a.local_crops] == [torch.Size([3, 16, 16, 8])] * 3
    assert all(x.dtype == torch.float32 for x in a.global_crops + a.local_crops)
    for x, y in zip(a.global_crops + a.local_crops, b.global_crops + b.local_crops, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.global_crops[0], c.global_crops[0])
    with pytest.raises(ValueError, match="multiple of the patch"):
        multi_crop(hu, step_generator(0, 0), local_size=12, patch_size=8)


# ------------------------------------------------------------------------------------------------- model
def test_teacher_starts_as_the_student_and_gets_no_gradients():
    model = tiny_dino()
    student = dict(model.student.named_parameters())
    teacher = dict(model.teacher.named_parameters())
    assert student.keys() == teacher.keys()
    for name, param in teacher.items():
        assert torch.equal(param, student[name]), name
        assert not param.requires_grad
    hu, _ = box_volumes(4, size=32)
    crops = multi_crop(hu, step_generator(0, 0), global_size=32, n_local=2, local_size=16)
    out = model(views(crops.global_crops), views(crops.local_crops), teacher_temp=0.04)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.encoder is model.student.encoder


def test_student_accepts_smaller_local_crops():
    model = tiny_dino()
    local = torch.rand(2, 4, 2, 16, 16, 16)  # 2 local views of a batch of 4 on a 2^3 token grid
    out = model(torch.rand(2, 4, 2, 32, 32, 32), local, teacher_temp=0.04)
    assert out["loss"].shape == () and math.isfinite(out["loss"].item())


def test_update_teacher_is_an_ema_of_the_student():
    model = tiny_dino()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher(1.0)
    assert all(torch.equal(p, before[n]) for n, p in model.teacher.named_parameters())
    model.update_teacher(0.75)
    student = dict(model.student.named_parameters())
    for name, param in model.teacher.named_parameters():
        assert torch.allclose(param, 0.75 * before[name] + 0.25 * student[name], atol=1e-6), name


def test_last_layer_frozen_in_the_first_epoch():
    model = tiny_dino()
    last = model.student.head.last_layer.parametrizations.weight

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        model(torch.rand(2, 2, 2, 32, 32, 32), torch.rand(1, 2, 2, 16, 16, 16), teacher_temp=0.04)["loss"].backward()

    backward()
    assert model.cancel_last_layer_grad(epoch=0, freeze_epochs=1)
    assert last.original1.grad is None or not last.original1.grad.any()
    backward()
    assert not model.cancel_last_layer_grad(epoch=1, freeze_epochs=1)
    assert last.original1.grad.abs().sum() > 0
    # the weight-norm magnitude is fixed to 1: logits are cosines
    assert not last.original0.requires_grad and torch.equal(last.original0, torch.ones_like(last.original0))
    logits = model.student.head(torch.randn(5, 48))
    assert logits.abs().max() <= 1.0 + 1e-5


def test_norms_biases_and_tokens_are_not_decayed():
    model = tiny_dino()
    optimizer = adamw(model, lr=1e-3, weight_decay=0.04)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    skip = model.no_weight_decay()
    assert "student.encoder.cls_token" in skip
    for name in decayed_names:
        assert name.startswith("student.") and name.endswith(("weight", "original1")), name
        assert "norm" not in name and "token" not in name
    for name, param in model.student.named_parameters(prefix="student"):
        if name.endswith("bias") or ".norm" in name or "token" in name:
            assert name in skip and id(param) not in decayed, name
    assert not any(names[id(p)].startswith("teacher.") for g in optimizer.param_groups for p in g["params"])


# -------------------------------------------------------------------------------------------------- loss
def test_loss_sums_every_teacher_student_pair_of_different_views():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=8, student_temp=0.1, center_momentum=0.9)
    student, teacher = torch.randn(4, 3, 8), torch.randn(2, 3, 8)
    got = loss_fn(student, teacher, teacher_temp=0.05, update_center=False)
    pairs = []
    for i in range(2):
        for j in range(4):
            if i != j:
                q = torch.softmax(teacher[i] / 0.05, dim=-1)
                pairs.append(-(q * torch.log_softmax(student[j] / 0.1, dim=-1)).sum(-1).mean())
    assert torch.allclose(got, torch.stack(pairs).mean(), atol=1e-5)


def test_center_moves_toward_the_teacher_mean():
    loss_fn = DINOLoss(out_dim=4, center_momentum=0.9)
    teacher = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(2, 3, 4)
    loss_fn(torch.zeros(3, 3, 4), teacher, teacher_temp=0.04)
    assert torch.allclose(loss_fn.center, 0.1 * teacher[0, 0])
    for _ in range(100):
        loss_fn.update_center(teacher)
    assert torch.allclose(loss_fn.center, teacher[0, 0], atol=1e-3)
    assert "center" in loss_fn.state_dict()  # checkpointed, so a resume continues exactly


def test_koleo_is_finite_and_falls_as_points_spread():
    torch.manual_seed(0)
    base = torch.randn(1, 16)
    values = [koleo_loss(base + spread * torch.randn(32, 16)).item() for spread in (0.01, 0.1, 1.0, 10.0)]
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values, reverse=True)
    duplicate = koleo_loss(torch.ones(4, 16))  # identical points: large but finite
    assert math.isfinite(duplicate.item())
    assert koleo_loss(torch.randn(1, 16)).item() == 0.0


def test_dino_head_shapes():
    head = DINOHead(48, out_dim=64, hidden_dim=32, bottleneck_dim=16, n_layers=3)
    assert head(torch.randn(5, 48)).shape == (5, 64)
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3


# ------------------------------------------------------------------------------------------------ schedules
def test_teacher_momentum_rises_monotonically_to_one():
    total = 1000
    values = [teacher_momentum(step, total, 0.996) for step in range(total)]
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == 1.0
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert teacher_momentum(total + 50, total) == 1.0


def test_teacher_temperature_warms_up_then_holds():
    assert teacher_temperature(0, 100, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(50, 100, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(100, 100, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(10_000, 100, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(5, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_weight_decay_rises_by_cosine():
    assert dino_weight_decay(0, 101) == pytest.approx(0.04)
    assert dino_weight_decay(50, 101) == pytest.approx(0.22)
    assert dino_weight_decay(100, 101) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------ training
def structured_heads(n: int = 8, size: int = 32) -> torch.Tensor:
    """Ellipsoidal heads (skull shell, parenchyma) padded with air; each head has its own parenchyma HU, so a
    view anywhere inside it still tells the heads apart."""
    ax = torch.arange(size, dtype=torch.float32) + 0.5
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    c = size / 2
    r = ((x - c) / (0.4 * size)) ** 2 + ((y - c) / (0.45 * size)) ** 2 + ((z - c) / (0.4 * size)) ** 2
    out = torch.full((n, size, size, size), float(AIR))
    for i in range(n):
        out[i] = torch.where(r < 1, 80.0 * i / (n - 1), AIR)
        out[i] = torch.where((r > 0.8) & (r < 1), 1200.0, out[i])
    return out.to(torch.int16)


def test_loss_falls_through_the_real_task_and_engine():
    """DINO as the job trains it: `DinoTask` (multi-crop, teacher temperature, last layer frozen in the first
    epoch, EMA teacher) on the one training engine (AdamW groups, lr and weight-decay schedules, clipping).

    The held-out loss falls when the start and the end are scored with the same (final) centre. The training
    losses cannot show it: the first steps run against a zero centre, which makes them artificially low (an
    uncentred, sharpened teacher puts every view on one prototype the student already agrees with).
    """
    from headct.config import PretrainConfig
    from headct.train.engine import train
    from headct.train.pretext import DinoTask
    from headct.train.schedules import warmup_cosine

    torch.set_num_threads(min(2, torch.get_num_threads()))
    steps, batch = 20, 4
    cfg = PretrainConfig(method="dino", patch_size=8, batch_size=batch, samples=steps * batch, lr=1e-3,
                         weight_decay=0.04, dino={"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
                                                  "local_crops": 2, "local_size": 16})

    def new_task() -> DinoTask:  # seeded: the initial weights, rebuilt at the end to score the start
        torch.manual_seed(0)
        encoder = ViT3D(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=4)
        return DinoTask(cfg, encoder, torch.device("cpu"), 0, total_steps=steps, steps_per_epoch=10)

    hu = structured_heads()
    task = new_task()
    optimizer = adamw(task.model, cfg.lr, cfg.weight_decay)
    batches = (hu[torch.randperm(len(hu), generator=torch.Generator().manual_seed(s))[:batch]] for s in range(steps))
    stats = train(task.model, optimizer, batches, lambda b, step, micro: task.loss(task.model, b, step, micro),
                  start_step=0, total_steps=steps, lr_at=lambda s: warmup_cosine(s, steps, cfg.lr, 2),
                  wd_at=lambda s: dino_weight_decay(s, steps, cfg.weight_decay, cfg.dino.weight_decay_end),
                  grad_clip=cfg.grad_clip, after_backward=task.after_backward, after_update=task.after_update)
    assert len(stats.losses) == steps and all(math.isfinite(v) for v in stats.losses)
    start, end = task.heldout_loss_of_initial(new_task(), hu), task.heldout_loss(hu)
    print(f"DINO held-out loss (final centre): start {start:.3f} end {end:.3f}")
    assert end < start - 0.5, (start, end)
    assert task.model.loss_fn.center.abs().max() > 0  # the engine's steps moved the centre
    assert [g["weight_decay"] for g in optimizer.param_groups] == [pytest.approx(0.4), 0.0]  # the schedule's end
    teacher, student = task.model.teacher.state_dict(), task.model.student.state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # EMA, not a copy


def test_models_and_crops_import_light():
    code = (
        "import sys, headct.models.dino, headct.models.vit, headct.data.crops\n"
        "heavy = [m for m in ('pydantic', 'monai', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
