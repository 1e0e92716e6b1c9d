"""Classification heads on encoder tokens, and the `Classifier` (backbone + head) fine-tuning trains.

Every backbone exposes ``forward_features(x) -> (B, 1 + N, D)`` tokens, CLS (or a global summary) first.
A head maps those tokens to one logit per output label:

- ``LinearHead``: BatchNorm1d without affine parameters, then a re-initialised Linear (as the linear head of
  FM-HCT / MAE's linear probing); it reads one pooled vector (CLS token or mean of the patch tokens).
- ``AttentivePoolHead``: one learned query cross-attends over the patch tokens (one multi-head attention
  layer), then LayerNorm and Linear; the pooling itself is learned.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Pool = Literal["cls", "mean", "attentive", "residual"]
# residual: the backbone is a masked-restoration model read out by its residual (headct.models.restoration.
# ResidualReadout), whose one token the linear head reads
POOLS: tuple[str, ...] = ("cls", "mean", "attentive", "residual")


class LinearHead(nn.Module):
    """(B, D) pooled features -> (B, n_outputs) logits: BatchNorm1d(affine=False) then Linear.

    The Linear weight is drawn from a truncated normal (std 0.01) and the bias zeroed, so a fresh head starts
    near chance whatever the backbone; the BatchNorm standardises features without learned scale/shift.
    """

    def __init__(self, dim: int, n_outputs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, n_outputs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.norm.reset_running_stats()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))


def head_counts(dim: int, most: int | None = None) -> list[int]:
    """The attention head counts a token width `dim` allows (MultiheadAttention needs dim % heads == 0), up to
    `most`."""
    return [h for h in range(1, min(dim, most or dim) + 1) if dim % h == 0]


class AttentivePoolHead(nn.Module):
    """(B, N, D) patch tokens -> (B, n_outputs) logits: a learned query attends over the tokens, then Linear.

    Args:
        dim: token width D.
        n_outputs: logits (labels).
        num_heads: attention heads; must divide D (ValueError naming the allowed counts otherwise: a count
            quietly lowered would train another model than the one asked for).
    """

    def __init__(self, dim: int, n_outputs: int, num_heads: int = 4) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the token width {dim}; allowed: "
                             f"{head_counts(dim)}")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, n_outputs)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the query's attention-weighted summary of the tokens."""
        query = self.query.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, _ = self.attention(query, tokens, tokens, need_weights=False)
        return pooled[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.pool(tokens)))


def build_head(pool: str, dim: int, n_outputs: int, num_heads: int = 4) -> nn.Module:
    """The head a pooling choice needs: attentive -> AttentivePoolHead, cls/mean/residual -> LinearHead."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "attentive":
        return AttentivePoolHead(dim, n_outputs, num_heads)
    return LinearHead(dim, n_outputs)


class Classifier(nn.Module):
    """Backbone + head: (B, C, X, Y, Z) windowed volumes in [0, 1] -> (B, n_outputs) logits.

    Args:
        backbone: a module with ``forward_features(x) -> (B, 1 + N, D)`` and ``embed_dim``.
        pool: "cls" (first token), "mean" (mean of the N patch tokens), "attentive" (learned query) or
            "residual" (the one token of a `ResidualReadout` backbone, which needs exactly that pool).
        n_outputs: number of labels (one logit each; sigmoid gives a probability per label).
        num_heads: attention heads of the attentive head.
    Attributes ``labels`` and ``windows`` are filled by `load_classifier` (not weights).
    """

    def __init__(self, backbone: nn.Module, pool: str, n_outputs: int, num_heads: int = 4) -> None:
        super().__init__()
        residual_backbone = getattr(backbone, "arch", {}).get("readout") == "residual"
        if (pool == "residual") != residual_backbone:
            raise ValueError("pool 'residual' reads a masked-restoration backbone's residual summary and nothing else "
                             f"(pool {pool!r}, backbone {getattr(backbone, 'arch', {}).get('name')!r}"
                             f"{' read out by its residual' if residual_backbone else ''})")
        self.backbone = backbone
        self.pool = pool
        self.head = build_head(pool, int(backbone.embed_dim), n_outputs, num_heads)
        self.labels: list[str] = []
        self.windows: list[Any] = []

    @property
    def head_type(self) -> str:
        return "attentive" if isinstance(self.head, AttentivePoolHead) else "linear"

    def no_weight_decay(self) -> set[str]:
        """Backbone token/position tables (prefixed) and the attentive query stay out of weight decay."""
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in inner} | {"head.query"}

    def head_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) tokens -> what the head reads: (B, D) pooled or (B, N, D) patch tokens."""
        if self.pool in ("cls", "residual"):
            return tokens[:, 0]
        if self.pool == "mean":
            return tokens[:, 1:].mean(dim=1)
        return tokens[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_input(self.backbone.forward_features(x)))
