from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import AttentionConfig, HeadShape, KVCache, Rotary, causal_mask, default_scale, mixing_stats, register
from .mha import MultiHeadAttention


@dataclass
class TalkingHeadsConfig(AttentionConfig):
    name: str = "tha"


@register("tha")
class TalkingHeadsAttention(MultiHeadAttention):
    """Talking-Heads attention (Shazeer et al. 2020, arXiv 2003.02436).

        L_h  = q_h k_hᵀ / √D                       logits of each head
        L′_j = Σ_h P_l[h, j] · L_h                  heads talk before the softmax
        W_j  = Σ_i P_w[i, j] · softmax(L′_i + causal)   and after it
        o_j  = W_j v_j,     y = W_O [o_1 … o_H]

    P_l and P_w are learned H×H matrices initialised to the identity, where THA is exactly `mha`. The mixing
    needs every head's T×S map at once, so this variant cannot use the fused attention kernel.
    """

    Config = TalkingHeadsConfig

    def __init__(self, cfg: TalkingHeadsConfig, shape: HeadShape, layer_idx: int):
        super().__init__(cfg, shape, layer_idx)
        self.mix_logits = nn.Parameter(torch.eye(shape.n_heads))
        self.mix_weights = nn.Parameter(torch.eye(shape.n_heads))

    def forward(self, x_BTC: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project(x_BTC)
        q, k = rope(q), rope(k)
        if cache is not None:
            k, v = cache.update(k, v)
        if (group := self.shape.n_heads // k.shape[1]) > 1:
            v = v.repeat_interleave(group, dim=1)
        weights_BHTS = mix_heads(self.mixed_probs(q, k), self.mix_weights)
        return self.output(weights_BHTS @ v)

    def mixed_probs(self, q_BHTD: torch.Tensor, k_BGSD: torch.Tensor) -> torch.Tensor:
        """softmax(L′): each head's distribution over the keys after the heads talk, before the second mixing."""
        if (group := self.shape.n_heads // k_BGSD.shape[1]) > 1:
            k_BGSD = k_BGSD.repeat_interleave(group, dim=1)
        logits_BHTS = (q_BHTD * default_scale(self.shape.head_dim)) @ k_BGSD.transpose(-2, -1)  # scale the small side
        T, S = logits_BHTS.shape[-2:]
        # Adding a 0/−inf bias, not masked_fill: its backward is free (the softmax already gives masked positions
        # zero gradient), and not in place: an in-place op on the mixed maps' view copies T×S maps in backward.
        causal_bias = torch.zeros(T, S, dtype=logits_BHTS.dtype, device=q_BHTD.device).masked_fill_(~causal_mask(T, S, q_BHTD.device), float("-inf"))
        return (mix_heads(logits_BHTS, self.mix_logits) + causal_bias).softmax(dim=-1)

    def attention_probs(self, x_BTC: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """softmax(L′) of each head, (B, H, T, T): the mixed weights W′ after it are no distribution."""
        q, k, _ = self.project(x_BTC)
        return self.mixed_probs(rope(q), rope(k))

    def dynamics(self) -> dict[str, float]:
        """How far P_l and P_w have moved from the identity (plain attention)."""
        eye = torch.eye(self.shape.n_heads, device=self.mix_logits.device)
        return mixing_stats("mix_logits", self.mix_logits, eye) | mixing_stats("mix_weights", self.mix_weights, eye)


def mix_heads(maps_BHTS: torch.Tensor, mix_HJ: torch.Tensor) -> torch.Tensor:
    """out_j = Σ_h mix[h, j] · map_h, as one (J×H)·(H×TS) matmul per batch element: no permuted copies of the maps."""
    B, H, T, S = maps_BHTS.shape
    return torch.bmm(mix_HJ.t().expand(B, -1, -1), maps_BHTS.reshape(B, H, T * S)).view(B, -1, T, S)
