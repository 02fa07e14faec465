from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AttentionConfig, HeadNorm, HeadShape, KVCache, Rotary, causal_attention, causal_probs, default_scale, register, rotate
from .mha import MultiHeadAttention


@dataclass
class DiffConfig(AttentionConfig):
    name: str = "diff"
    norm: bool = True
    lambda_init_std: float = 0.1
    pair_heads: bool = False  # true: the published layout, each pair of the model's heads is one head of width 2D


@register("diff")
class DifferentialAttention(MultiHeadAttention):
    """Differential attention (Ye et al. 2024, arXiv 2410.05258), the paper's "+DFA".

    Each head splits its query and key into halves q¹, q², k¹, k² of width D/2 and weights V (width D) by the
    difference of two softmax maps:

        o_h = (softmax(q¹_h k¹ᵀ / √(D/2)) − λ · softmax(q²_h k²ᵀ / √(D/2))) v_h
        λ   = exp(λq1·λk1) − exp(λq2·λk2) + λ_init,     λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)),  l = 1 … L
        y   = W_O [(1 − λ_init) · RMSNorm_h(o_h)]        (norm=false drops the RMSNorm and the scale)

    Heads: by default H heads of width D, as the official module does with the head count it is given; with
    pair_heads=true, H/2 heads of width 2D (halves of width D), the layout of the published models, which halve the
    head count so that each map has mha's head width and the 2 maps of H/2 heads cost about what mha's H maps
    cost. Either way the parameters and the KV cache's bytes equal `mha`'s. One λ per layer, as in the official
    code; the RMSNorm's scale is learned per head and channel.
    """

    Config = DiffConfig

    def __init__(self, cfg: DiffConfig, shape: HeadShape, layer_idx: int):
        if cfg.pair_heads:
            if shape.n_heads % 2 or shape.n_kv_heads % 2:
                raise ValueError(f"attention.pair_heads=true needs even model.n_heads and model.n_kv_heads (each pair of heads is one head); "
                                 f"got {shape.n_heads} and {shape.n_kv_heads}: choose even counts or set attention.pair_heads=false")
            shape = HeadShape(shape.dim, shape.n_heads // 2, shape.n_kv_heads // 2)
        super().__init__(cfg, shape, layer_idx)
        if shape.head_dim % 4:
            raise ValueError(f"attention=diff needs a head width divisible by 4 (halves rotated by RoPE); got model.dim/model.n_heads={shape.head_dim}")
        half = shape.head_dim // 2
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(half) * cfg.lambda_init_std) for _ in range(4)
        )
        if cfg.norm:
            self.head_norm = HeadNorm(shape.n_heads, shape.head_dim, center=False, gain=1.0 - self.lambda_init)

    def lambda_(self) -> torch.Tensor:
        return (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )

    def forward(self, x_BTC: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project(x_BTC)
        q12, k = self.rotate_halves(q, k, rope)
        if cache is not None:
            k, v = cache.update(k, v)
        # Both maps of every head in one fused call, as DIFF V2 does: 2H query heads, q¹_h and q²_h side by side at
        # 2h and 2h+1, over the G key/value heads (grouped-query attention: both read head h's keys and values).
        o_BH2TD = causal_attention(q12, k, v, default_scale(self.shape.head_dim // 2)).unflatten(1, (-1, 2))
        return self.output(torch.addcmul(o_BH2TD[:, :, 0], o_BH2TD[:, :, 1], -self.lambda_()))

    def rotate_halves(self, q: torch.Tensor, k: torch.Tensor, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2H, T, D): q¹_h at 2h and q²_h at 2h+1, each q rotated with the other half zeroed; and k with both halves
        rotated: q¹·k = q¹_h·k¹_h."""
        # Each half is rotated as a head of width D/2. q¹·k¹ is then q rotated with its second half zeroed, dotted
        # with the whole k (likewise q²·k²): both maps run the fused kernel at the full width D, where E = Ev keeps
        # SDPA on its flash path (2.3x faster on CPU than halves), and the zeroing rides on the rotation, which
        # writes the two queries of every head side by side in one pass.
        turns = rope.turns(self.shape.head_dim // 2)
        zero = torch.zeros_like(turns)
        both_2Tp2 = torch.stack([torch.cat([turns, zero], dim=-2), torch.cat([zero, turns], dim=-2)])
        return rotate(q[:, :, None], both_2Tp2).flatten(1, 2), rotate(k, torch.cat([turns, turns], dim=-2))

    def attention_probs(self, x_BTC: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """The two softmax maps of every head, (B, 2H, T, T): first maps in 0 … H−1, second maps in H … 2H−1
        (their difference is no distribution)."""
        q, k, _ = self.project(x_BTC)
        q12, k = self.rotate_halves(q, k, rope)
        maps_BH2TS = causal_probs(q12, k, default_scale(self.shape.head_dim // 2)).unflatten(1, (-1, 2))
        return maps_BH2TS.transpose(1, 2).flatten(1, 2)

    def dynamics(self) -> dict[str, float]:
        return super().dynamics() | {"lambda": self.lambda_().item()}
