"""The ViT surface timm users expect: forward_intermediates, stochastic depth, AdamW parameter groups.

Tiny encoders on CPU."""

from __future__ import annotations

import pytest
import torch

from headct.models.blocks import DropPath, drop_path_rates
from headct.models.dino import DINO
from headct.models.heads import Classifier
from headct.models.mae import MAE
from headct.models.model_dir import load_model_dir, save_model_dir
from headct.models.vit import ViT3D, build_encoder
from headct.train.param_groups import no_weight_decay_names, param_groups, set_lrs

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def encoder(depth: int = 4, registers: int = 2, drop_path_rate: float = 0.0) -> ViT3D:
    torch.manual_seed(0)
    arch = {"name": "tiny", "img_size": 16, "patch_size": 4, "in_chans": 3, "depth": depth,
            "num_registers": registers}
    return build_encoder(arch, drop_path_rate=drop_path_rate)


# ----------------------------------------------------------------------------------- forward_intermediates
def test_last_normed_map_is_forward_features_patch_tokens_on_a_non_cubic_grid() -> None:
    enc = encoder().eval()
    x = torch.rand(2, 3, 24, 16, 20)  # grid (6, 4, 5): positions resampled from the built (4, 4, 4)
    with torch.no_grad():
        tokens = enc.forward_features(x)
        final, maps = enc.forward_intermediates(x, indices=[-1], norm=True, return_prefix_tokens=True)
    (spatial, prefix), = maps
    assert spatial.shape == (2, 192, 6, 4, 5) and prefix.shape == (2, 1 + 2, 192)
    assert torch.equal(final, tokens)  # the final features are forward_features' (registers dropped)
    expected = tokens[:, 1:].reshape(2, 6, 4, 5, 192).permute(0, 4, 1, 2, 3)
    assert torch.allclose(spatial, expected, atol=1e-6)
    assert torch.allclose(prefix[:, 0], tokens[:, 0], atol=1e-6)  # CLS, normed like forward_features'


def test_maps_are_laid_out_like_the_conv3d_patch_embedding() -> None:
    # With identity blocks (zeroed residual branches) and no positions, a block's map is the patch embedding
    # itself, so its (D, gx, gy, gz) layout must equal what the stored Conv3d computes on the volume.
    enc = encoder(depth=2, registers=0).eval()
    with torch.no_grad():
        for block in enc.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        enc.pos_embed.zero_()
        x = torch.rand(1, 3, 16, 12, 8)
        (spatial,) = enc.forward_intermediates(x, indices=1, intermediates_only=True)
        conv = enc.patch_embed.proj(x)
    assert spatial.shape == conv.shape == (1, 192, 4, 3, 2)
    assert torch.allclose(spatial, conv, atol=1e-5)


def test_indices_select_blocks_like_timm_and_nlc_gives_tokens() -> None:
    enc = encoder().eval()
    x = torch.rand(2, 3, 16, 16, 16)
    with torch.no_grad():
        _, every = enc.forward_intermediates(x)  # None = every block
        last_two = enc.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = enc.forward_intermediates(x, indices=[-1, 0, 3], intermediates_only=True)  # -1 and 3 are one
        nlc = enc.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    assert len(every) == 4 and all(m.shape == (2, 192, 4, 4, 4) for m in every)
    assert len(last_two) == 2 and torch.equal(last_two[0], every[2]) and torch.equal(last_two[1], every[3])
    assert len(picked) == 2 and torch.equal(picked[0], every[0]) and torch.equal(picked[1], every[3])
    assert not torch.allclose(every[0], every[3])
    assert nlc[0].shape == (2, 64, 192)
    assert torch.equal(nlc[0].transpose(1, 2).reshape(2, 192, 4, 4, 4), every[1])


LAST_N = r"asks for the last n blocks; n must be in 1\.\.4$"
BLOCKS = r"a non-empty list of ints in \[-4, 3\] for this 4-block encoder, got "


@pytest.mark.parametrize("indices, message", [
    (0, LAST_N), (5, LAST_N), (-1, LAST_N), ([4], BLOCKS + r"\[4\]"), ([-5], BLOCKS + r"\[-5\]"),
    ([], BLOCKS + r"\[\]"), ([0.5], BLOCKS + r"\[0\.5\]"),
    ("1", r"indices must be an int, a list of block indices or None, got '1'"),
    (True, r"indices must be an int, a list of block indices or None, got True"),
])
def test_out_of_range_indices_are_refused_with_the_valid_range(indices, message: str) -> None:
    enc = encoder()
    with pytest.raises(ValueError, match=message):
        enc.forward_intermediates(torch.rand(1, 3, 16, 16, 16), indices=indices)


def test_bad_output_format_is_refused() -> None:
    with pytest.raises(ValueError, match="output_fmt"):
        encoder().forward_intermediates(torch.rand(1, 3, 16, 16, 16), output_fmt="NCHW")


def test_blocks_after_the_last_requested_one_are_not_run_when_only_intermediates_are_asked() -> None:
    enc = encoder().eval()
    calls: list[int] = []
    for i, block in enumerate(enc.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        enc.forward_intermediates(torch.rand(1, 3, 16, 16, 16), indices=[1], intermediates_only=True)
        assert calls == [0, 1]
        calls.clear()
        enc.forward_intermediates(torch.rand(1, 3, 16, 16, 16), indices=[1])  # final features need them all
        assert calls == [0, 1, 2, 3]


def test_pruning_keeps_the_requested_blocks_and_a_model_directory_of_it_reloads(tmp_path) -> None:
    enc = encoder().eval()
    x = torch.rand(1, 3, 16, 16, 16)
    with torch.no_grad():
        before = enc.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert enc.prune_intermediate_layers([0, 1]) == [0, 1]
        after = enc.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(enc.blocks) == 2 and enc.arch["depth"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    config = {"preprocess": {"shape": [16, 16, 16]}, "method": "mae", "provenance": {}, "windows": []}
    loaded, _ = load_model_dir(save_model_dir(tmp_path / "m", enc, config))
    assert torch.equal(loaded.forward_features(x), enc.forward_features(x))


# ----------------------------------------------------------------------------------------- drop path
def test_drop_path_adds_no_weights_and_loads_existing_model_directories_strictly(tmp_path) -> None:
    plain, dropping = encoder(), encoder(drop_path_rate=0.3)
    assert list(plain.state_dict()) == list(dropping.state_dict())
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in dropping.state_dict().items())  # same init
    assert plain.arch == dropping.arch  # a training setting, not architecture
    config = {"preprocess": {"shape": [16, 16, 16]}, "method": "mae", "provenance": {}, "windows": []}
    path = save_model_dir(tmp_path / "m", plain, config)
    loaded, _ = load_model_dir(path)  # strict
    loaded.set_drop_path_rate(0.2)
    assert [b.drop_path.p for b in loaded.blocks] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])


def test_rate_zero_is_the_plain_pre_norm_block_in_train_mode() -> None:
    enc = encoder(drop_path_rate=0.0).train()
    x = torch.rand(2, 3, 16, 16, 16)
    with torch.no_grad():
        out = enc.forward_features(x)
        tokens = enc.prepend_cls(enc.tokenize(x))
        for b in enc.blocks:  # x + attn(norm1(x)), then x + mlp(norm2(x)): the block before drop-path existed
            tokens = tokens + b.attn(b.norm1(tokens))
            tokens = tokens + b.mlp(b.norm2(tokens))
        reference = enc.drop_registers(enc.norm(tokens))
        assert torch.equal(out, reference)
        assert torch.equal(enc.eval().forward_features(x), out)


def test_positive_rate_changes_training_outputs_only() -> None:
    plain, dropping = encoder().eval(), encoder(drop_path_rate=0.5)
    x = torch.rand(4, 3, 16, 16, 16)
    with torch.no_grad():
        reference = plain.forward_features(x)
        torch.manual_seed(1)
        trained = dropping.train().forward_features(x)
        assert torch.equal(dropping.eval().forward_features(x), reference)
    assert not torch.allclose(trained, reference)
    dropping.train().forward_pooled(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dropping.parameters())


def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    layer = DropPath(0.5)
    x = torch.ones(256, 3, 4)
    torch.manual_seed(0)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # one decision per sample
    assert 0.35 < (per_sample[:, 0] > 0).float().mean() < 0.65
    assert layer.eval()(x) is x
    assert drop_path_rates(0.1, 1) == [0.0] and drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop-path rate"):
            encoder(drop_path_rate=bad)


# -------------------------------------------------------------------------------------- parameter groups
def classifier(pool: str = "attentive") -> Classifier:
    return Classifier(encoder(depth=4, registers=2), pool, n_outputs=3)


def by_name(groups: list[dict], model: torch.nn.Module) -> dict[str, dict]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g for g in groups for p in g["params"]}


def test_layer_decay_scales_of_a_four_block_model() -> None:
    model = classifier()
    groups = param_groups(model, 0.05, layer_decay=0.5, head_lr_mult=10.0)
    of = by_name(groups, model)
    scale = {n: g["lr_scale"] for n, g in of.items()}
    assert scale["backbone.patch_embed.proj.weight"] == scale["backbone.cls_token"] == 0.5**5
    assert scale["backbone.register_tokens"] == 0.5**5
    for i in range(4):
        block = f"backbone.blocks.{i}"
        assert scale[f"{block}.attn.qkv.weight"] == scale[f"{block}.norm1.bias"] == 0.5 ** (4 - i)
    assert scale["backbone.norm.weight"] == 1.0
    assert scale["head.linear.weight"] == scale["head.query"] == 10.0
    assert of["backbone.blocks.3.mlp.fc1.weight"]["name"] == "backbone.blocks.3/decay"
    assert of["head.linear.bias"]["part"] == "head" and of["backbone.norm.bias"]["part"] == "body"
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    # without layer decay: one body scale, the head's multiplier still applies
    flat = by_name(param_groups(model, 0.05, head_lr_mult=10.0), model)
    assert {g["lr_scale"] for n, g in flat.items() if n.startswith("backbone.")} == {1.0}
    assert flat["head.linear.weight"]["lr_scale"] == 10.0


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_every_parameter_is_in_exactly_one_group(layer_decay) -> None:
    model = classifier()
    groups = param_groups(model, 0.05, layer_decay=layer_decay)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert set(grouped) == {id(p) for p in model.parameters()}


def test_no_decay_on_biases_norms_and_token_tables_only() -> None:
    model = classifier()
    of = by_name(param_groups(model, 0.05, layer_decay=0.75), model)
    undecayed = {n for n, g in of.items() if g["weight_decay"] == 0.0}
    expected = {n for n, p in model.named_parameters() if p.ndim == 1}  # biases and LayerNorm weights
    expected |= {"backbone.cls_token", "backbone.register_tokens", "head.query"}
    assert undecayed == expected
    assert {g["weight_decay"] for n, g in of.items() if n not in expected} == {0.05}
    assert "backbone.pos_embed" in no_weight_decay_names(model)  # a fixed buffer, listed for timm parity


def test_without_layer_decay_the_groups_are_pretrainings_adamw_groups() -> None:
    # Same parameters, same order, same decay: pre-training could build its optimizer from param_groups and
    # keep both its weights and its saved optimizer states.
    from headct.models.resnet import ResNetBackbone
    from headct.train.engine import adamw

    torch.manual_seed(0)
    models = [MAE(encoder(), decoder_dim=48),
              DINO(encoder(), out_dim=32, hidden_dim=32, bottleneck_dim=16),
              Classifier(ResNetBackbone("resnet10"), "mean", 2)]
    for model in models:
        reference = adamw(model, 1e-3, 0.05).param_groups
        ours = param_groups(model, 0.05, head_modules=())
        assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in reference]
        assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in reference] == [0.05, 0.0]
        no_decay_at_all = param_groups(model, 0.0, head_modules=())  # same order even when nothing decays
        assert [[id(p) for p in g["params"]] for g in no_decay_at_all] == [[id(p) for p in g["params"]]
                                                                           for g in reference]


def test_groups_drive_adamw_and_the_schedule_applies_lr_scale() -> None:
    model = classifier("cls")
    groups = param_groups(model, 0.05, layer_decay=0.5, head_lr_mult=4.0, base_lr=1e-3)
    assert {round(g["lr"] / g["lr_scale"], 12) for g in groups} == {1e-3}
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    set_lrs(optimizer, 2e-4)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-4 * group["lr_scale"])
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    model(torch.rand(2, 3, 16, 16, 16)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)


def test_misuse_is_refused_with_a_reason() -> None:
    from headct.models.resnet import ResNetBackbone

    resnet = Classifier(ResNetBackbone("resnet10"), "mean", 2)
    with pytest.raises(ValueError, match="needs a ViT3D"):
        param_groups(resnet, 0.05, layer_decay=0.75)
    with pytest.raises(ValueError, match=r"head modules \['classifier'\]"):
        param_groups(classifier(), 0.05, head_modules=("classifier",), head_lr_mult=10.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            param_groups(classifier(), 0.05, layer_decay=bad)
