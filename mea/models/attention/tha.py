from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    needs every head's T×S map at once, so this variant cannot use the fused attention kernel. It runs over blocks
    of `query_block` queries instead (DCFormer's chunking): each block reads only the keys its queries can see,
    and in training its maps are recomputed in backward rather than kept, so what a step saves does not grow with
    T² (at T 2048 it would be 6.9× what `mha` saves).
    """

    Config = TalkingHeadsConfig
    query_block = 256  # queries a block: its transient maps are B·H·256·S floats

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
        T, S = q.shape[2], k.shape[2]
        if T <= self.query_block:
            return self.output(self.talking_heads(q, k, v))
        blocks = []
        for start in range(0, T, self.query_block):
            end = min(start + self.query_block, T)
            seen = S - T + end  # the block's queries are the last of the keys up to here: the causal mask as for the whole
            q_block, k_seen, v_seen = q[:, :, start:end], k[:, :, :seen], v[:, :, :seen]
            if torch.is_grad_enabled():
                blocks.append(checkpoint(self.talking_heads, q_block, k_seen, v_seen, use_reentrant=False))
            else:
                blocks.append(self.talking_heads(q_block, k_seen, v_seen))
        return self.output(torch.cat(blocks, dim=2))

    def talking_heads(self, q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        """o_j = W_j v_j for T queries that are the last T of the S keys."""
        return mix_heads(self.mixed_probs(q_BHTD, k_BGSD), self.mix_weights) @ v_BHSD

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
