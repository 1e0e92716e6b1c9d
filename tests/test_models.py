"""The encoder, MAE, HU windows, schedules and model directories (tiny shapes; CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from headct.data.windows import hu_to_windows
from headct.errors import InputError
from headct.models.mae import MAE
from headct.models.model_dir import load_model_dir, save_model_dir
from headct.models.pos_embed import interpolate_pos_embed, sincos_pos_embed_3d
from headct.models.vit import ViT3D, build_encoder, sizes
from headct.train.schedules import cosine, warmup_cosine

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_arch(**kw):
    return {"name": "tiny", "img_size": 16, "patch_size": 4, "in_chans": 3, **kw}  # 64 patches of 4^3


# --------------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("name", sizes())
def test_every_size_runs_forward_and_backward_at_tiny_resolution(name: str) -> None:
    torch.manual_seed(0)
    # Depth capped at 2 to keep the table fast; width, heads and MLP are the size's own.
    enc = build_encoder({"name": name, "img_size": 16, "patch_size": 8, "in_chans": 3, "depth": 2})
    x = torch.rand(2, 3, 16, 16, 16)
    tokens = enc.forward_features(x)
    assert tokens.shape == (2, 1 + 8, enc.embed_dim)
    assert enc.forward_pooled(x, "cls").shape == (2, enc.embed_dim)
    pooled = enc.forward_pooled(x, "mean")
    pooled.square().mean().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(tokens).all()
    assert {"cls_token", "pos_embed"} <= enc.no_weight_decay()


def test_base_has_fm_hct_parameter_count() -> None:
    # FM-HCT ViT-B: 96^3, patch 12, no qkv bias, about 89.4 M parameters. Its position table (513 x 768) is
    # learned there and fixed here, so ours is 0.39 M smaller; still within 1 %.
    enc = build_encoder({"name": "base", "img_size": 96, "patch_size": 12, "in_chans": 3, "qkv_bias": False})
    n = sum(p.numel() for p in enc.parameters())
    print(f"ViT-B 96^3 patch 12: {n / 1e6:.2f} M parameters (+ {enc.pos_embed.numel() / 1e6:.2f} M fixed positions)")
    assert abs(n - 89.4e6) / 89.4e6 < 0.01
    assert enc.num_patches == 512 and enc.embed_dim == 768


def test_registers_join_the_blocks_but_never_the_output() -> None:
    torch.manual_seed(0)
    enc = build_encoder(tiny_arch(num_registers=4, depth=2))
    x = torch.rand(2, 3, 16, 16, 16)
    tokens = enc.forward_features(x)
    assert tokens.shape == (2, 1 + 64, 192)  # CLS + patches; the 4 registers are dropped
    assert enc.num_prefix_tokens == 5 and "register_tokens" in enc.no_weight_decay()
    # They do take part: changing them changes the patch tokens.
    with torch.no_grad():
        enc.register_tokens.add_(1.0)
    assert not torch.allclose(enc.forward_features(x), tokens)
    assert build_encoder(enc.arch).arch == enc.arch  # round-trips through a model directory's arch
    mae = MAE(enc, mask_ratio=0.75, decoder_dim=48)
    loss, pred, masking = mae(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and pred.shape == (2, 48, 3 * 4**3)


def test_attention_weights_are_the_ones_sdpa_applies() -> None:
    torch.manual_seed(0)
    enc = build_encoder(tiny_arch(depth=3, num_registers=1)).eval()
    x = torch.rand(2, 3, 16, 16, 16)
    with torch.no_grad():
        maps = enc.attention_maps(x, blocks="all")
        (last,) = enc.attention_maps(x)
        # The explicit-softmax path must give the same block output as the SDPA path.
        tokens = enc.prepend_cls(enc.tokenize(x))
        explicit, _ = enc.blocks[0](tokens, return_attention=True)
        fused = enc.blocks[0](tokens)
    assert len(maps) == 3 and torch.allclose(maps[-1], last, atol=1e-6)
    t = 1 + 1 + 64
    assert last.shape == (2, enc.num_heads, t, t)
    assert torch.allclose(last.sum(-1), torch.ones(2, enc.num_heads, t), atol=1e-5)
    assert torch.allclose(explicit, fused, atol=1e-5)
    cls_to_patches = last[:, :, 0, enc.num_prefix_tokens:].mean(1).reshape(2, *enc.grid_of(x))
    assert cls_to_patches.shape == (2, 4, 4, 4)
    # What SDPA applies, read off SDPA itself: attending over identity "values" returns its weights, row by row.
    with torch.no_grad():
        for block in enc.blocks[:-1]:
            tokens = block(tokens)
        attn = enc.blocks[-1].attn
        q, k, _ = attn.qkv(enc.blocks[-1].norm1(tokens)).reshape(2, t, 3, enc.num_heads, -1).permute(2, 0, 3, 1, 4)
        applied = torch.nn.functional.scaled_dot_product_attention(q, k, torch.eye(t).expand(2, enc.num_heads, t, t))
    assert torch.allclose(last, applied, atol=1e-5)


def test_patch_embedding_equals_the_conv3d_it_stores() -> None:
    torch.manual_seed(0)
    enc = build_encoder(tiny_arch())
    x = torch.rand(2, 3, 16, 16, 16)
    conv = enc.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D) in (x, y, z) C-order
    assert torch.allclose(enc.patch_embed(enc.patch_embed.patchify(x)), conv, atol=1e-5)


def test_position_table_and_resampling_to_another_grid() -> None:
    table = sincos_pos_embed_3d(192, (4, 4, 4))
    assert table.shape == (1 + 64, 192) and torch.all(table[0] == 0)
    assert len({tuple(r.tolist()) for r in table[1:]}) == 64  # every position distinct
    assert torch.equal(interpolate_pos_embed(table, (4, 4, 4), (4, 4, 4)), table)
    assert interpolate_pos_embed(table, (4, 4, 4), (6, 4, 2)).shape == (1 + 48, 192)
    assert sincos_pos_embed_3d(128, (2, 2, 2)).shape == (9, 128)  # width not divisible by 6 works too
    enc = build_encoder(tiny_arch())
    assert enc.forward_features(torch.rand(1, 3, 24, 16, 20)).shape == (1, 1 + 6 * 4 * 5, 192)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (tiny_arch(patch_size=6), "must divide"),
        (tiny_arch(name="huge"), "unknown encoder size"),
        (tiny_arch(colour="red"), "unknown arch keys"),
        (tiny_arch(embed_dim=100), "not divisible by num_heads"),
    ],
)
def test_illegal_arch_is_refused_with_a_reason(arch: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_encoder(arch)


# ------------------------------------------------------------------------------------------------- MAE
def make_mae(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(build_encoder(tiny_arch()), **kw)


def test_masking_keeps_exactly_the_visible_share_and_differs_per_sample() -> None:
    mae = make_mae(mask_ratio=0.75)
    masking = mae.random_masking(4, 64, torch.Generator().manual_seed(1))
    mask = masking.mask
    assert masking.ids_keep.shape == (4, 16) and masking.ids_masked.shape == (4, 48)
    assert torch.all(mask.sum(dim=1) == 48)  # exactly N - round(N * 0.25) masked in every sample
    for b in range(4):  # kept and masked indices partition the grid, and agree with the mask
        assert set(masking.ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert set(masking.ids_masked[b].tolist()) == set(torch.nonzero(mask[b] == 1).flatten().tolist())
    assert len({tuple(m.tolist()) for m in mask}) == 4  # different samples, different masks
    again = mae.random_masking(4, 64, torch.Generator().manual_seed(1)).mask
    assert torch.equal(mask, again)  # same generator seed, same masks
    latent, _ = mae.forward_encoder(torch.rand(4, 64, 3 * 4**3), torch.Generator().manual_seed(1))
    assert latent.shape == (4, 1 + 16, 192)  # the encoder sees CLS + visible tokens only


def test_loss_counts_masked_patches_only() -> None:
    mae = make_mae()
    masking = mae.random_masking(2, 64, torch.Generator().manual_seed(0))
    patches = torch.rand(2, 64, 3 * 4**3)
    rows = torch.arange(2)[:, None]
    pred = patches[rows, masking.ids_masked].clone()
    assert mae.forward_loss(patches, pred, masking).item() == 0.0
    changed = patches.clone()
    changed[rows, masking.ids_keep] += 5.0  # visible patches changed: no effect on the loss
    assert mae.forward_loss(changed, pred, masking).item() == 0.0
    assert mae.forward_loss(patches, pred + 1.0, masking).item() == pytest.approx(1.0)


def test_mae_step_learns_and_patchify_round_trips() -> None:
    mae = make_mae()
    x = torch.rand(2, 3, 16, 16, 16)
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for step in range(5):
        loss, pred, masking = mae(x, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pred.shape == (2, 48, 3 * 4**3) and masking.mask.shape == (2, 64)
    assert losses[-1] < losses[0]
    mask_volume, recon = mae.reconstruct(x, torch.Generator().manual_seed(0))
    assert mask_volume.shape == (2, 1, 16, 16, 16) and recon.shape == x.shape
    visible = mask_volume.expand_as(x) == 0
    assert torch.equal(recon[visible], x[visible])  # visible patches pasted from the input
    assert not torch.equal(recon[~visible], x[~visible])  # masked ones predicted


# --------------------------------------------------------------------------------------------- windows
def test_windows_map_level_minus_half_width_to_0_and_plus_half_width_to_1() -> None:
    windows = [{"name": "brain", "level": 40, "width": 80}, {"name": "bone", "level": 600, "width": 2800}]
    hu = torch.tensor([0, 80, -800, 2000, 40, -3000, 3000], dtype=torch.int16).view(1, 7, 1, 1)
    out = hu_to_windows(hu, windows)
    assert out.dtype == torch.float32 and out.shape == (1, 2, 7, 1, 1)
    brain, bone = out[0, 0].flatten().tolist(), out[0, 1].flatten().tolist()
    assert brain[:2] == [0.0, 1.0] and brain[4] == pytest.approx(0.5)
    assert bone[2:4] == [0.0, 1.0]
    assert min(brain + bone) == 0.0 and max(brain + bone) == 1.0  # clipped beyond the window
    assert hu_to_windows(hu.float(), windows).equal(out)
    assert hu_to_windows(hu).shape[1] == 3  # default: brain, subdural, bone


# ------------------------------------------------------------------------------------------- schedules
def test_warmup_then_cosine_with_monotone_pieces() -> None:
    total, warmup, peak = 100, 10, 1e-3
    lrs = [warmup_cosine(s, total, peak, warmup, final=1e-5) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup], strict=False))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert lrs[-1] == pytest.approx(1e-5)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04) and cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert math.isclose(cosine(5, 10, 0.0, 1.0), 0.5)


# -------------------------------------------------------------------------------------- model directory
def _model_dir(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(tiny_arch())
    config = {"preprocess": {"shape": [16, 16, 16], "version": "x"}, "method": "mae", "provenance": {},
              "windows": [{"name": "brain", "level": 40, "width": 80}]}
    return enc, save_model_dir(tmp_path / "m", enc, config)


def test_model_dir_round_trip_gives_identical_outputs(tmp_path) -> None:
    enc, path = _model_dir(tmp_path)
    loaded, config = load_model_dir(path)
    assert isinstance(loaded, ViT3D) and config["arch"] == enc.arch and config["method"] == "mae"
    x = torch.rand(2, 3, 16, 16, 16)
    enc.eval()
    assert torch.equal(loaded.forward_features(x), enc.forward_features(x))


@pytest.mark.parametrize("tamper", ["missing", "extra"])
def test_tampered_weights_raise_naming_the_keys(tmp_path, tamper: str) -> None:
    from safetensors.torch import load_file, save_file

    _, path = _model_dir(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    if tamper == "missing":
        del state["blocks.0.attn.qkv.weight"]
        key = "blocks.0.attn.qkv.weight"
    else:
        state["head.weight"] = torch.zeros(2, 2)
        key = "head.weight"
    save_file(state, str(path / "model.safetensors"))
    missing, unexpected = ([key], []) if tamper == "missing" else ([], [key])
    with pytest.raises(InputError, match=re.escape(f"missing keys {missing}, unexpected keys {unexpected}, "
                                                   "wrong shapes []")):
        load_model_dir(path)


def test_model_dir_with_another_arch_is_refused(tmp_path) -> None:
    _, path = _model_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["arch"]["depth"] = 2  # weights of blocks 2..5 are now unexpected
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="unexpected keys.*blocks.2"):
        load_model_dir(path)
