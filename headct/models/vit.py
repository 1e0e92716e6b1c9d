"""A 3D Vision Transformer encoder for CT volumes (Dosovitskiy et al. 2021, in 3D as in FM-HCT).

Reads top-down: patch embedding, the encoder, then the named sizes (the blocks are in headct.models.blocks).
Input is a windowed volume (B, C, X, Y, Z) float in [0, 1] (C = HU windows, see headct.data.windows);
the cube is cut into non-overlapping patch**3 voxel patches, one token each, plus a CLS token and optional
register tokens (Darcet et al. 2024, "Vision Transformers Need Registers": extra learned tokens that absorb the
high-norm "artefact" activations, so the patch tokens' attention maps stay clean). Registers take part in every
block but are dropped from what the encoder returns: callers always see CLS + patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from headct.models.blocks import Attention, Block, DropPath, Mlp, drop_path_rates, init_weights
from headct.models.pos_embed import interpolate_pos_embed, sincos_pos_embed_3d

__all__ = ["Attention", "Block", "DropPath", "Mlp", "PatchEmbed3D", "ViT3D", "build_encoder", "init_weights",
           "register_size", "sizes"]


def _triple(v: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    if len(v) != 3:
        raise ValueError(f"expected one int or three, got {v!r}")
    return (int(v[0]), int(v[1]), int(v[2]))


class PatchEmbed3D(nn.Module):
    """Cubic patches -> tokens: a Conv3d with kernel = stride = patch, evaluated as patchify + matmul.

    The weight keeps the Conv3d layout (D, C, p, p, p) of timm/FM-HCT checkpoints; ``proj(x)`` gives the same
    tokens. The matmul form is used because on CPU it is about 3x faster than Conv3d forward+backward and it
    lets MAE embed only the visible patches.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        w = self.proj.weight.data  # initialised like a linear layer on the flattened patch (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, N, C * p**3): patches in (x, y, z) C-order, voxels in Conv3d weight order."""
        b, c, sx, sy, sz = x.shape
        p = self.patch_size
        if sx % p or sy % p or sz % p:
            raise ValueError(f"volume grid {[sx, sy, sz]} is not divisible by patch {p}")
        v = x.reshape(b, c, sx // p, p, sy // p, p, sz // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return v.reshape(b, (sx // p) * (sy // p) * (sz // p), c * p**3)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, C * p**3) -> (B, N, D)."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ViT3D(nn.Module):
    """3D ViT encoder: Conv3d patch embedding, 3D sin-cos positions (fixed, or learned from that start), CLS
    (+ register) tokens, pre-norm blocks, LayerNorm.

    Args:
        img_size: volume grid (X, Y, Z) in voxels the model is built for (one int = a cube).
        patch_size: edge of a cubic patch in voxels; must divide every entry of ``img_size``.
        in_chans: input channels (HU windows).
        embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP hidden/width.
        qkv_bias: learn a bias on the query/key/value projection.
        num_registers: extra learned tokens after CLS (0 = none); used inside the blocks, never returned.
        name: the registered size this was built from (kept in ``arch`` for the model directory).
        pos_embed: "sincos" = a fixed table recomputed from ``arch`` (not saved); "learned" = a (1, N, D) parameter
            started from that table and saved with the weights (FM-HCT's layout; headct.models.import_fmhct).
        block_norm_eps: the blocks' LayerNorm epsilon (the final norm keeps 1e-6). The two options enter ``arch``
            only when not at their defaults, so existing model directories describe the same encoder.
        drop_path_rate: stochastic depth of the last block; block i gets rate * i / (depth - 1), 0 = off. A
            training-time setting, not architecture: it adds no weights and is not kept in ``arch``
            (``set_drop_path_rate`` sets it on a loaded encoder).

    Example:
        >>> enc = build_encoder({"name": "tiny", "img_size": 64, "patch_size": 16, "in_chans": 3})
        >>> enc.forward_features(torch.rand(2, 3, 64, 64, 64)).shape   # 4**3 patches + CLS
        torch.Size([2, 65, 192])
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 96,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_registers: int = 0,
        name: str = "custom",
        drop_path_rate: float = 0.0,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        block_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        img = _triple(img_size)
        if patch_size < 1 or any(s % patch_size for s in img):
            raise ValueError(f"patch_size {patch_size} must divide every dimension of img_size {list(img)}")
        if in_chans < 1 or depth < 1:
            raise ValueError(f"in_chans and depth must be >= 1, got {in_chans} and {depth}")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.arch: dict[str, Any] = {
            "name": name, "img_size": list(img), "patch_size": patch_size, "in_chans": in_chans,
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias, "num_registers": num_registers,
            **({"pos_embed": pos_embed} if pos_embed != "sincos" else {}),
            **({"block_norm_eps": block_norm_eps} if block_norm_eps != 1e-6 else {}),
        }
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.grid: tuple[int, int, int] = (img[0] // patch_size, img[1] // patch_size, img[2] // patch_size)
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.num_registers = num_registers
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.learned_pos = pos_embed == "learned"
        if self.learned_pos:  # (1, N, D): no CLS row, as in MONAI/FM-HCT (the CLS token carries no position)
            self.pos_embed = nn.Parameter(sincos_pos_embed_3d(embed_dim, self.grid, cls_token=False)[None])
        else:  # fixed and recomputable from `arch`, so it is not part of the saved weights
            self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps=block_norm_eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.set_drop_path_rate(drop_path_rate)

        nn.init.normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=0.02)
        self.blocks.apply(init_weights)
        self.norm.apply(init_weights)

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth for fine-tuning: block i drops its residual branches with probability
        rate * i / (depth - 1) in training mode (DeiT/timm's linear rule); 0 switches it off. Use it on an
        encoder loaded from a model directory, e.g. ``load_model_dir(path)[0].set_drop_path_rate(0.1)``."""
        for block, p in zip(self.blocks, drop_path_rates(rate, len(self.blocks)), strict=True):
            block.drop_path.p = p
        self.drop_path_rate = float(rate)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides norms and biases (token and position tables)."""
        return {"cls_token", "pos_embed", "register_tokens"}

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens inside the blocks: CLS + registers."""
        return 1 + self.num_registers

    def pos_embed_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(1, 1 + gx*gy*gz, D): the position table (CLS row zero), resampled when ``grid`` differs from the built
        one."""
        table = F.pad(self.pos_embed, (0, 0, 1, 0)) if self.learned_pos else self.pos_embed
        return table if tuple(grid) == self.grid else interpolate_pos_embed(table, self.grid, grid)

    def grid_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (gx, gy, gz) of a (B, C, X, Y, Z) batch."""
        if x.dim() != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) batch, got shape {list(x.shape)}")
        p = self.patch_size
        return (x.shape[2] // p, x.shape[3] // p, x.shape[4] // p)

    def embed_patches(
        self, patches: torch.Tensor, grid: tuple[int, int, int], ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K, C * p**3) patches -> (B, K, D) tokens with positions added (no CLS yet).

        ``ids`` (B, K) gives each patch's index in the full grid when only some patches are passed (MAE).
        """
        pos = self.pos_embed_for(grid)[:, 1:].to(patches.dtype)  # (1, N, D)
        if ids is not None:
            pos = torch.gather(pos.expand(ids.shape[0], -1, -1), 1, ids[:, :, None].expand(-1, -1, pos.shape[2]))
        return self.patch_embed(patches) + pos

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, N, D) patch tokens with their positions added (no CLS yet)."""
        return self.embed_patches(self.patch_embed.patchify(x), self.grid_of(x))

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1 + R + N, D): CLS, the R registers, then the patch tokens. Prefix tokens carry no
        position (the CLS row of the table is zero; registers are position-free by design)."""
        b = tokens.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(b, -1, -1))
        return torch.cat([*prefix, tokens], dim=1)

    def drop_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + R + N, D) -> (B, 1 + N, D)."""
        if not self.num_registers:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens:]], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): the transformer blocks then the final LayerNorm (registers kept)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) float -> (B, 1 + N, D) normed tokens, CLS first (registers dropped)."""
        return self.drop_registers(self.encode(self.prepend_cls(self.tokenize(x))))

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's block selection: None = every block, an int n = the last n, a list = those blocks (negative
        from the end); sorted, duplicates merged. Anything out of range is a ValueError naming the valid range."""
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, bool) or not isinstance(indices, int | Sequence) or isinstance(indices, str):
            raise ValueError(f"indices must be an int, a list of block indices or None, got {indices!r}")
        if isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"indices={indices} asks for the last n blocks; n must be in 1..{depth}")
            return list(range(depth - indices, depth))
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth]
        if bad or not indices:
            raise ValueError(f"block indices must be a non-empty list of ints in [-{depth}, {depth - 1}] for "
                             f"this {depth}-block encoder, got {list(indices)}")
        return sorted({i % depth for i in indices})

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: Literal["NCDHW", "NLC"] = "NCDHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        stop_early: bool = False,
    ) -> Any:
        """Block outputs as feature maps, with timm's ``VisionTransformer.forward_intermediates`` semantics.

        Args:
            x: (B, C, X, Y, Z) volumes; any grid divisible by the patch (positions are resampled).
            indices: None = every block; an int n = the last n blocks; a list = those block indices (negative
                count from the end). Out of range -> ValueError.
            norm: pass each intermediate through the final LayerNorm (the last block's then equals
                ``forward_features``' patch tokens).
            output_fmt: "NCDHW" -> (B, D, gx, gy, gz) maps of the patch tokens (grid ``grid_of(x)``, in the
                (x, y, z) order of the volume); "NLC" -> (B, N, D) patch tokens.
            intermediates_only: return just the list (blocks after the last requested one are not run).
            return_prefix_tokens: each intermediate becomes (map, prefix) with prefix (B, 1 + R, D): CLS and the
                R registers of that block (normed too when ``norm``).
            stop_early: stop after the last requested block even when the final features are returned (they are
                then that block's tokens through the final norm, as in timm).
        Returns:
            ``intermediates`` (in block order) if ``intermediates_only``, else ``(final, intermediates)`` where
            ``final`` is (B, 1 + N, D) as from ``forward_features`` (normed, CLS first, registers dropped).
        """
        if output_fmt not in ("NCDHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCDHW' or 'NLC', got {output_fmt!r}")
        take = self._take_indices(indices)
        grid = self.grid_of(x)
        tokens = self.prepend_cls(self.tokenize(x))
        n_run = take[-1] + 1 if intermediates_only or stop_early else len(self.blocks)
        n_prefix = self.num_prefix_tokens
        out: list[Any] = []
        for i, block in enumerate(self.blocks[:n_run]):
            tokens = block(tokens)
            if i not in take:
                continue
            y = self.norm(tokens) if norm else tokens
            patches = y[:, n_prefix:]
            if output_fmt == "NCDHW":  # (B, N, D) in (x, y, z) C-order -> (B, D, gx, gy, gz)
                patches = patches.transpose(1, 2).reshape(y.shape[0], y.shape[2], *grid)
            out.append((patches, y[:, :n_prefix]) if return_prefix_tokens else patches)
        if intermediates_only:
            return out
        return self.drop_registers(self.norm(tokens)), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = 1) -> list[int]:
        """Drop the blocks after the last of ``indices`` (timm's name); returns the kept block indices.

        ``arch["depth"]`` follows, so a model directory saved afterwards describes the pruned encoder. The final
        norm is kept (``norm=False`` in ``forward_intermediates`` ignores it).
        """
        take = self._take_indices(indices)
        self.blocks = self.blocks[: take[-1] + 1]
        self.arch["depth"] = len(self.blocks)
        return take

    def attention_maps(self, x: torch.Tensor, blocks: Literal["last", "all"] = "last") -> list[torch.Tensor]:
        """Attention weights (B, H, T, T) of the last block or of every block (for attention rollout).

        T = 1 + R + N in the blocks' token order (CLS, registers, patches in (x, y, z) C-order); each row sums to
        1. ``weights[:, :, 0, self.num_prefix_tokens:]`` is the CLS-to-patch attention, reshaped with
        ``grid_of(x)`` to a (gx, gy, gz) map.
        """
        tokens = self.prepend_cls(self.tokenize(x))
        maps = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if blocks == "all" or i == last:
                tokens, weights = block(tokens, return_attention=True)
                maps.append(weights)
            else:
                tokens = block(tokens)
        return maps

    def forward_pooled(self, x: torch.Tensor, pool: Literal["cls", "mean"] = "cls") -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, D): the CLS token, or the mean of the patch tokens."""
        return pool_tokens(self.forward_features(x), pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)


# ----------------------------------------------------------------------------------------------- named sizes
_SIZES: dict[str, Callable[..., ViT3D]] = {}


def register_size(fn: Callable[..., ViT3D]) -> Callable[..., ViT3D]:
    """Register ``vit_<name>`` as the named size ``<name>``."""
    _SIZES[fn.__name__.removeprefix("vit_")] = fn
    return fn


def sizes() -> list[str]:
    """Registered size names, smallest first."""
    return list(_SIZES)


@register_size
def vit_tiny(**kwargs: Any) -> ViT3D:
    """Demo/CPU size: width 192, depth 6, 3 heads: 2.7 M parameters in the blocks, plus the patch embedding
    (2.4 M at patch 16 with 3 windows)."""
    return ViT3D(**{"embed_dim": 192, "depth": 6, "num_heads": 3, **kwargs, "name": "tiny"})


@register_size
def vit_small(**kwargs: Any) -> ViT3D:
    """ViT-S: width 384, depth 12, 6 heads."""
    return ViT3D(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs, "name": "small"})


@register_size
def vit_base(**kwargs: Any) -> ViT3D:
    """ViT-B as in FM-HCT: width 768, depth 12, 12 heads, MLP 3072 (89.4 M parameters at 96^3, patch 12)."""
    return ViT3D(**{"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, **kwargs, "name": "base"})


_ARCH_KEYS = {"name", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
              "qkv_bias", "num_registers", "pos_embed", "block_norm_eps"}


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> (B, D): token 0 ("cls"; the small CNN's global max) or the mean of the others."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def build_encoder(arch: dict[str, Any], drop_path_rate: float = 0.0) -> ViT3D:
    """Build the encoder a model directory's ``config.json["arch"]`` describes (``ViT3D.arch`` round-trips).

    ``name`` picks a registered size; the other keys override its defaults. Unknown keys are an error.
    ``drop_path_rate`` is stochastic depth for training (not architecture, so not an ``arch`` key).
    """
    unknown = sorted(set(arch) - _ARCH_KEYS)
    if unknown:
        raise ValueError(f"unknown arch keys {unknown}; allowed: {sorted(_ARCH_KEYS)}")
    name = arch.get("name")
    if name not in _SIZES:
        raise ValueError(f"unknown encoder size {name!r}; registered: {sizes()}")
    return _SIZES[name](**{k: v for k, v in arch.items() if k != "name"}, drop_path_rate=drop_path_rate)
