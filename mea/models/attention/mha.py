from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import AttentionConfig, HeadNorm, HeadShape, KVCache, Rotary, causal_attention, causal_probs, default_scale, register, split_heads


@dataclass
class MHAConfig(AttentionConfig):
    name: str = "mha"


@register("mha")
class MultiHeadAttention(nn.Module):
    """Standard multi-head attention (Vaswani et al. 2017), with G <= H key/value heads (GQA/MQA).

        o_h = softmax(q_h k_{g(h)}ᵀ / √D + causal) v_{g(h)},   g(h) = ⌊h·G/H⌋,   y = W_O [o_1 … o_H]

    Q, K and V come from one fused projection; RoPE rotates q and k.
    """

    Config = MHAConfig
    any_kv_heads = False  # G must divide H: query heads share key/value heads in equal groups

    def __init__(self, cfg: AttentionConfig, shape: HeadShape, layer_idx: int):
        super().__init__()
        self.shape = shape
        H, G, D = shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.wqkv = nn.Linear(shape.dim, (H + 2 * G) * D, bias=False)
        self.wo = nn.Linear(H * D, shape.dim, bias=False)
        self.head_norm: HeadNorm | None = None

    def project(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split_qkv(self.wqkv(x_BTC))

    def split_qkv(self, qkv_BTX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, D = self.shape.n_heads, self.shape.head_dim
        kv_heads = (qkv_BTX.shape[-1] // D - H) // 2
        q, k, v = qkv_BTX.split([H * D, kv_heads * D, kv_heads * D], dim=-1)
        return split_heads(q, H), split_heads(k, kv_heads), split_heads(v, kv_heads)

    def forward(self, x_BTC: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project(x_BTC)
        q, k = rope(q), rope(k)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.output(causal_attention(q, k, v))

    def output(self, o_BHTD: torch.Tensor) -> torch.Tensor:
        """y = W_O [o_1 … o_H], through the head norm where a variant has one (its scale folded into W_O)."""
        # Heads moved next to each other before the norm: a view wherever the kernel wrote its output
        # position-major (as SDPA does), so neither path copies o or keeps more than the kernel keeps.
        o_BTHD = o_BHTD.transpose(1, 2)
        if self.head_norm is None:
            return self.wo(o_BTHD.flatten(2))
        return self.head_norm.project(o_BTHD, self.wo.weight)

    def attention_probs(self, x_BTC: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """Each head's attention distribution over the keys, (B, H, T, T), for the dynamics at eval steps."""
        q, k, _ = self.project(x_BTC)
        return causal_probs(rope(q), rope(k), default_scale(self.shape.head_dim))

    def dynamics(self) -> dict[str, float]:
        """This layer's own parameters as numbers for the dynamics at eval steps: the head-norm scale mean |γ|."""
        return {} if self.head_norm is None else {"head_norm_scale": self.head_norm.weight.abs().mean().item()}
