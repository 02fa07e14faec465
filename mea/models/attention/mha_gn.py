from __future__ import annotations

from dataclasses import dataclass

from .base import AttentionConfig, HeadNorm, HeadShape, register
from .mha import MultiHeadAttention


@dataclass
class MHAGroupNormConfig(AttentionConfig):
    name: str = "mha_gn"


@register("mha_gn")
class MultiHeadAttentionGroupNorm(MultiHeadAttention):
    """The paper's "+GroupNorm" baseline: `mha` with a head-level norm before the output projection.

        y = W_O [GN(o_1) … GN(o_H)],   GN(o) = γ_h ⊙ (o − mean(o)) / std(o)   (one group per head, per token)

    It separates the norm's share of MEA's gain from HLC's. Choice: GroupNorm proper (centred), with a learned
    scale per head and channel and no bias, as the rest of the model has no biases.
    """

    Config = MHAGroupNormConfig

    def __init__(self, cfg: AttentionConfig, shape: HeadShape, layer_idx: int):
        super().__init__(cfg, shape, layer_idx)
        self.head_norm = HeadNorm(shape.n_heads, shape.head_dim, center=True)
