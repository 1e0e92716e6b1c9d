"""Transformer building blocks shared by the ViT3D encoder and the MAE decoder: attention, MLP, stochastic depth
and the pre-norm block, plus the MAE/timm weight initialisation.

None of these adds a parameter beyond the ones the saved model directories hold: stochastic depth
(``DropPath``) is a rate, not a weight, so switching it on for fine-tuning leaves the state dict unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention on (B, T, D) tokens via torch SDPA (flash/memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> Any:
        """(B, T, D) -> (B, T, D); with ``return_attention`` also the weights (B, H, T, T), rows summing to 1.

        The weights are only materialised on request (explicit softmax, same maths as SDPA); training always
        takes the fused SDPA kernel.
        """
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:
            weights = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, d)
            return self.proj(out), weights
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016; as in DeiT/timm): in training, drop a residual branch for a whole
    sample with probability ``p`` and scale the kept ones by 1 / (1 - p), so the expected output is unchanged.

    Identity (the very same tensor) in eval mode and at p = 0. The keep/drop draw uses torch's global RNG,
    which the training checkpoints save and restore, so a resumed run draws the same masks.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = check_rate(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # one draw per sample
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def check_rate(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
    return float(p)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))); (B, T, D) -> (B, T, D).

    ``drop_path`` is the stochastic-depth rate of both residual branches (0 = the plain block); ``norm_eps`` the
    LayerNorms' epsilon (1e-6 as in timm/MAE; MONAI-style checkpoints such as FM-HCT's use torch's 1e-5).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> Any:
        """With ``return_attention``: (tokens, attention weights (B, H, T, T))."""
        if return_attention:
            out, weights = self.attn(self.norm1(x), return_attention=True)
            x = x + self.drop_path(out)
            return x + self.drop_path(self.mlp(self.norm2(x))), weights
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block rates rising linearly from 0 (first block) to ``rate`` (last block), as in DeiT/timm: deeper
    blocks are dropped more often."""
    check_rate(rate)
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


def init_weights(module: nn.Module) -> None:
    """MAE/timm initialisation: Xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
