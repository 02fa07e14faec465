"""What every attention variant shares: the registry, the head shape, rotary embeddings,
the per-head norm, the KV cache and causal attention over it.

Shape suffixes in names: B batch, T new tokens, S keys (cached + new), H query heads,
G stored key/value heads, D head width, C model width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionConfig:
    """Base of every variant's config; `name` picks the variant from the registry."""

    name: str = "mha"


@dataclass(frozen=True)
class HeadShape:
    dim: int
    n_heads: int
    n_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in REGISTRY:
            raise ValueError(f"attention variant {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def variant_class(name: str) -> type[nn.Module]:
    if name not in REGISTRY:
        raise ValueError(f"attention.name={name!r} is not a known variant; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_attention(cfg: AttentionConfig, shape: HeadShape, layer_idx: int) -> nn.Module:
    return variant_class(cfg.name)(cfg, shape, layer_idx)


class Rotary:
    """RoPE for the positions of one forward call, at whatever head width it meets.

    Channels (2i, 2i+1) of a head of width d are one complex number, turned by the angle p·θ^(−2i/d) at
    position p (the pairing of Llama's reference code): eager, one complex multiply forward and one backward, 1.8×
    faster on CPU than rotating halves with real arithmetic; compiled, real arithmetic (rotate). Every head is turned alike, so RoPE commutes with
    any linear mixing across heads.
    """

    def __init__(self, positions: torch.Tensor, theta: float):
        self.positions = positions
        self.theta = theta
        self._turns: dict[int, torch.Tensor] = {}

    def turns(self, width: int) -> torch.Tensor:
        """(T, width/2, 2): the cosine and sine of the turn of each position and channel pair of a head of this
        width (real numbers, so that a compiled graph holds no complex op: inductor has no code for them), computed
        once per forward call in eager mode. Compiled, they are computed where used (the compiler fuses them):
        filling the cache inside a block that activation checkpointing recomputes is a side effect it cannot
        replay, and a graph break."""
        if torch.compiler.is_compiling():
            return self.computed_turns(width)
        if width not in self._turns:
            self._turns[width] = self.computed_turns(width)
        return self._turns[width]

    def computed_turns(self, width: int) -> torch.Tensor:
        inv_freq = self.theta ** -(torch.arange(0, width, 2, device=self.positions.device, dtype=torch.float32) / width)
        angles = self.positions.float()[:, None] * inv_freq[None, :]
        return torch.stack([angles.cos(), angles.sin()], dim=-1)

    def __call__(self, x_BhTd: torch.Tensor) -> torch.Tensor:
        return rotate(x_BhTd, self.turns(x_BhTd.shape[-1]))


def rotate(x_BhTd: torch.Tensor, turns_Tp2: torch.Tensor) -> torch.Tensor:
    """x with channel pair j of every head turned by turns_Tp2[:, j] (its cosine and sine), in float32.

    Eager, one complex multiply. Compiled, the same turn in real arithmetic, (a, b) -> (a·c − b·s, a·s + b·c):
    inductor generates no code for complex numbers and leaves such a multiply unfused, with copies in and out
    of the complex view (compiled, forward and backward, 1.27x faster on CPU in real arithmetic; eager, the
    complex multiply is 1.9x faster)."""
    if torch.compiler.is_compiling():
        pairs = x_BhTd.float().unflatten(-1, (-1, 2))
        a, b, c, s = pairs[..., 0], pairs[..., 1], turns_Tp2[..., 0], turns_Tp2[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x_BhTd)
    x = x_BhTd.float()
    if x.stride(-1) != 1:  # a complex view needs each pair adjacent in memory
        x = x.contiguous()
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * torch.view_as_complex(turns_Tp2)).flatten(-2).type_as(x_BhTd)


class HeadNorm(nn.Module):
    """Normalises each head's output vector on its own, with a learned scale per head and channel.

    center=True is GroupNorm with one group per head (mean and variance); center=False is RMSNorm per head.
    The scale (times a fixed gain) is linear and comes right before W_O, so it is folded into W_O's columns
    rather than applied to the activations, and `project` normalises and projects in one autograd step that
    keeps only what the attention kernel keeps anyway: no extra pass over (B, T, H, D), nothing more saved.
    """

    def __init__(self, n_heads: int, head_dim: int, center: bool, eps: float = 1e-5, gain: float = 1.0):
        super().__init__()
        self.center = center
        self.eps = eps
        self.gain = gain
        self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim))

    def project(self, o_BTHD: torch.Tensor, w_out_CX: torch.Tensor) -> torch.Tensor:
        """W_O [γ·gain·norm(o_1) … γ·gain·norm(o_H)], heads merged: (B, T, H, D) -> (B, T, C)."""
        return NormThenProject.apply(o_BTHD, w_out_CX * (self.weight * self.gain).reshape(1, -1), self.center, self.eps)


class NormThenProject(torch.autograd.Function):
    """y = norm(o) Wᵀ over merged heads, norm(o) = (o − μ)·r per head (μ = 0 for RMS), r = 1/√(mean((o − μ)²) + eps).

    W's gradient needs norm(o), a (B, T, H·D) tensor that plain autograd would keep; backward rebuilds it from o
    (which the attention kernel keeps anyway) and the per-head statistics, one pass more instead. Statistics in
    float32, as torch's norms compute them.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, o_BTHD: torch.Tensor, w_CX: torch.Tensor, center: bool, eps: float) -> torch.Tensor:
        width = (o_BTHD.shape[-1],)
        if center:
            n, mean, rstd = torch.native_layer_norm(o_BTHD, width, None, None, eps)
        else:
            norm = torch.linalg.vector_norm(o_BTHD, dim=-1, keepdim=True, dtype=torch.promote_types(o_BTHD.dtype, torch.float32))
            mean, rstd = None, torch.rsqrt(norm.square() / width[0] + eps)
            n = (o_BTHD * rstd).to(o_BTHD.dtype)
        ctx.center, ctx.eps = center, eps
        ctx.save_for_backward(o_BTHD, mean, rstd, w_CX)
        return F.linear(n.flatten(-2), w_CX)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_BTC: torch.Tensor):
        o, mean, rstd, w = ctx.saved_tensors
        width = (o.shape[-1],)
        o32 = at_least_float32(o)
        n32 = (o32 - mean).mul_(rstd) if ctx.center else o32 * rstd
        n = n32.to(o.dtype)
        dn = (g_BTC @ w.to(g_BTC.dtype)).view(o.shape).to(o.dtype)  # CPU autocast does not reach into backward: cast by hand
        dw = g_BTC.flatten(0, -2).t() @ n.flatten(-2).flatten(0, -2).to(g_BTC.dtype)
        if ctx.center:
            do = torch.ops.aten.native_layer_norm_backward(dn, o, width, mean, rstd, None, None, [True, False, False])[0]
        else:  # d/do of n = o·r with r = 1/√(mean(o²) + eps): r·(dn − n·mean(dn·n))
            dn32 = at_least_float32(dn)
            dn_dot_n = torch.linalg.vecdot(dn32, n32).unsqueeze(-1)
            do = torch.addcmul(dn32, n32, dn_dot_n, value=-1 / width[0]).mul_(rstd).to(o.dtype)
        return do, dw, None, None


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class KVCache:
    """Keys and values of one layer for incremental decoding, grown in place up to max_len positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k_BhTd: torch.Tensor, v_BhTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k_BhTd.shape[2]
        if self.k is None:
            B, h, _, d = k_BhTd.shape
            self.k = k_BhTd.new_empty(B, h, self.max_len, d)
            self.v = v_BhTd.new_empty(B, v_BhTd.shape[1], self.max_len, v_BhTd.shape[3])
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {T} tokens > max_len={self.max_len}; create the cache with a larger max_len")
        self.k[:, :, self.length : self.length + T] = k_BhTd
        self.v[:, :, self.length : self.length + T] = v_BhTd
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part of the cache."""
        if self.k is None:
            return 0
        per_position = (self.k[:, :, :1].numel() + self.v[:, :, :1].numel()) * self.k.element_size()
        return per_position * self.length


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask for T new queries that sit at the end of S keys."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def causal_attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSE: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Fused scaled-dot-product attention where the T queries are the last T of the S positions.

    Query head h reads key/value head h // (H / G) (grouped-query attention when G < H).
    """
    T, S = q_BHTD.shape[2], k_BGSD.shape[2]
    gqa = q_BHTD.shape[1] != k_BGSD.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSE, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = None if T == 1 else causal_mask(T, S, q_BHTD.device)
    return F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSE, attn_mask=mask, scale=scale, enable_gqa=gqa)


def causal_probs(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ·scale + causal) of every query head, (B, H, T, S): the map a fused kernel never shows."""
    if (group := q_BHTD.shape[1] // k_BGSD.shape[1]) > 1:
        k_BGSD = k_BGSD.repeat_interleave(group, dim=1)
    T, S = q_BHTD.shape[2], k_BGSD.shape[2]
    logits = (q_BHTD @ k_BGSD.transpose(-2, -1) * scale).masked_fill(~causal_mask(T, S, q_BHTD.device), float("-inf"))
    return logits.softmax(dim=-1)


def mixing_stats(name: str, mix: torch.Tensor, identity: torch.Tensor) -> dict[str, float]:
    """How far a head-mixing matrix has moved from where the heads do not talk: ‖M − I‖_F, and the share of
    Σ|M| that lies off the identity's support (0: no head reads another)."""
    off = identity == 0
    return {f"{name}_dist": (mix - identity).norm().item(), f"{name}_offdiag": (mix.abs()[off].sum() / mix.abs().sum()).item()}


def split_heads(x_BTX: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, _ = x_BTX.shape
    return x_BTX.view(B, T, n_heads, -1).transpose(1, 2)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
