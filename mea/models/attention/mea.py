from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionConfig, HeadNorm, HeadShape, KVCache, Rotary, causal_mask, default_scale, mixing_stats, register
from .mha import MultiHeadAttention

HLC_INITS = ("identity", "identity_noise", "random")
DECODE_QUERIES = 16  # new tokens up to which a GPU reads the compressed cache by batched matmuls, past it the fused kernel


@dataclass
class MEAConfig(AttentionConfig):
    name: str = "mea"
    mix_keys: bool = True
    mix_values: bool = True
    norm: bool = True
    hlc_init: str = "identity_noise"
    hlc_init_std: float = 0.02
    fold_hlc: bool = True

    def __post_init__(self):
        if self.hlc_init not in HLC_INITS:
            raise ValueError(f"attention.hlc_init={self.hlc_init!r} is not allowed; choose one of: {', '.join(HLC_INITS)}")


def grouped_identity(G: int, H: int) -> torch.Tensor:
    """The G×H composition that copies stored head g to its H/G query heads: identity at G = H, GQA below."""
    return (torch.arange(H)[None, :] * G // H == torch.arange(G)[:, None]).float()


@register("mea")
class ExplicitAttention(MultiHeadAttention):
    """Multi-head Explicit Attention (Peng et al. 2026, arXiv 2601.19611): HLC + head-level GroupNorm.

    G stored key/value heads K⁰ = X W_K⁰, V⁰ = X W_V⁰ are recombined into H heads by Head-level Linear
    Composition, learned G×H matrices C_K and C_V:

        k_h = Σ_g C_K[g, h] k⁰_g,   v_h = Σ_g C_V[g, h] v⁰_g
        o_h = softmax(q_h k_hᵀ / √D + causal) v_h,    y = W_O [GN(o_1) … GN(o_H)]

    G = H is the paper's MEA; G < H gives "virtual heads" and a KV cache of G heads.
    HLC is linear across heads and RoPE rotates all heads alike, so training folds it into the projection,
    W_K = W_K⁰ C_K (one matmul, the fused kernel, the cost of `mha`); fold_hlc=false mixes (B, H, T, D)
    tensors instead, for reference. With G < H the cache keeps the stored heads and decoding absorbs C_K into
    the queries and applies C_V after the attention, never building H heads per cached token.
    Choices: identity_noise init (identity plus N(0, hlc_init_std)); the norm is GroupNorm with one group per
    head, as `mha_gn`; a side with mixing off keeps the fixed identity (GQA when G < H).
    """

    Config = MEAConfig
    any_kv_heads = True  # HLC composes H heads from any G stored ones

    def __init__(self, cfg: MEAConfig, shape: HeadShape, layer_idx: int):
        super().__init__(cfg, shape, layer_idx)
        self.fold_hlc = cfg.fold_hlc
        G, H = shape.n_kv_heads, shape.n_heads
        for side, learned in (("hlc_k", cfg.mix_keys), ("hlc_v", cfg.mix_values)):
            init = grouped_identity(G, H)
            if learned and cfg.hlc_init == "identity_noise":
                init = init + torch.randn(G, H) * cfg.hlc_init_std
            elif learned and cfg.hlc_init == "random":
                init = torch.randn(G, H) / G**0.5
            if learned:
                self.register_parameter(side, nn.Parameter(init))
            else:
                self.register_buffer(side, init)
        if cfg.norm:
            self.head_norm = HeadNorm(H, shape.head_dim, center=True)

    def stored_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, G, D = self.shape.n_heads, self.shape.n_kv_heads, self.shape.head_dim
        return self.wqkv.weight.split([H * D, G * D, G * D], dim=0)

    def project(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v with H heads each, HLC applied."""
        if not self.fold_hlc:
            q, k0, v0 = super().project(x_BTC)
            return q, compose(k0, self.hlc_k), compose(v0, self.hlc_v)
        w_q, w_k0, w_v0 = self.stored_weights()
        w_qkv = torch.cat([w_q, fold(w_k0, self.hlc_k), fold(w_v0, self.hlc_v)], dim=0)
        return self.split_qkv(F.linear(x_BTC, w_qkv))

    def forward(self, x_BTC: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        if cache is None or self.shape.n_kv_heads == self.shape.n_heads:
            return super().forward(x_BTC, rope, cache)
        q, k0, v0 = self.split_qkv(self.wqkv(x_BTC))
        # The cache keeps the G stored heads side by side, (B, 1, S, G·D): read as one shared head with no copy.
        k_B1SX, v_B1SX = cache.update(side_by_side(rope(k0)), side_by_side(v0))
        return self.output(self.absorbed_attention(rope(q), k_B1SX, v_B1SX))

    def dynamics(self) -> dict[str, float]:
        """The head norm's scale, and how far C_K and C_V have moved from no mixing (the identity, or GQA's copy)."""
        no_mixing = grouped_identity(self.shape.n_kv_heads, self.shape.n_heads).to(self.hlc_k.device)
        return super().dynamics() | mixing_stats("hlc_k", self.hlc_k, no_mixing) | mixing_stats("hlc_v", self.hlc_v, no_mixing)

    def absorbed_attention(self, q_BHTD: torch.Tensor, k_B1SX: torch.Tensor, v_B1SX: torch.Tensor) -> torch.Tensor:
        """Attention of H queries over G stored heads, side by side as one shared head of width G·D.

        q_h · k_h = Σ_g (C_K[g, h] q_h) · k⁰_g   and   A_h v_h = Σ_g C_V[g, h] (A_h v⁰_g).
        The H·T queries go in as rows of that one head, so each cached token is read once for all heads
        (GQA-style broadcasting of the shared head measured 3.4× slower on CPU). On a GPU, decoding (T up to
        DECODE_QUERIES) reads the cache by two batched matmuls, as MLA's absorbed decode does: the fused kernels
        take no head this wide or run one block per (query block, head, batch) with no split of the cached length
        (64 blocks for 132 multiprocessors at batch 64 on an H200, 2.02× the full cache's step). A CPU's fused
        kernel reads it faster than its BLAS's skinny products (bench/decode.py on the CI's Intel VM: 0.67× the
        full cache's step against 0.86×), so a CPU keeps that kernel.
        """
        B, H, T, D = q_BHTD.shape
        G = self.hlc_k.shape[0]
        q_BRX = (q_BHTD[:, :, :, None, :] * self.hlc_k.T[None, :, None, :, None]).reshape(B, H * T, G * D)
        mask_RS = None if T == 1 else causal_mask(T, k_B1SX.shape[2], q_BHTD.device).repeat(H, 1)
        if T <= DECODE_QUERIES and q_BHTD.is_cuda:
            o_BRX = attention_by_matmuls(q_BRX, k_B1SX[:, 0], v_B1SX[:, 0], mask_RS, default_scale(D))
        else:
            o_BRX = F.scaled_dot_product_attention(q_BRX[:, None], k_B1SX, v_B1SX, attn_mask=mask_RS, scale=default_scale(D))[:, 0]
        return torch.einsum("bhtgd,gh->bhtd", o_BRX.view(B, H, T, G, D), self.hlc_v)


def attention_by_matmuls(q_BRX: torch.Tensor, k_BSX: torch.Tensor, v_BSX: torch.Tensor, mask_RS: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q kᵀ·scale, masked) v for R query rows over one shared head of S cached positions, as two batched
    matmuls over the cache: bound by its bytes where a fused kernel is not (ExplicitAttention.absorbed_attention)."""
    # cache times queries, then a transposed view: the same product with the cache as the long operand (M = S), the
    # orientation a BLAS serves best (q·kᵀ, with the R rows as M, ran 1.7× slower on a CPU's)
    logits_BRS = torch.bmm(k_BSX, (q_BRX * scale).transpose(1, 2)).transpose(1, 2)
    if mask_RS is not None:
        logits_BRS = logits_BRS.masked_fill(~mask_RS, float("-inf"))
    return torch.bmm(logits_BRS.float().softmax(dim=-1).type_as(v_BSX), v_BSX)


def side_by_side(x_BGTD: torch.Tensor) -> torch.Tensor:
    """(B, G, T, D) -> (B, 1, T, G·D): the G heads of each position next to each other."""
    B, G, T, D = x_BGTD.shape
    return x_BGTD.transpose(1, 2).reshape(B, 1, T, G * D)


def fold(w_stored_XC: torch.Tensor, hlc_GH: torch.Tensor) -> torch.Tensor:
    """Projection weight of the H composed heads from that of the G stored heads: W_h = Σ_g C[g, h] W⁰_g."""
    # Head g's rows, read as one row of width D·C, make (G, D·C); Cᵀ times that is (H, D·C), already laid out as the
    # (H·D, C) weight: one matmul, no permutes (an einsum here took 35% longer, forward + backward)
    G = hlc_GH.shape[0]
    return (hlc_GH.t() @ w_stored_XC.reshape(G, -1)).view(-1, w_stored_XC.shape[-1])


def compose(x_BGTD: torch.Tensor, hlc_GH: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bgtd,gh->bhtd", x_BGTD, hlc_GH)
