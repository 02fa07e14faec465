"""A Llama-style decoder-only language model whose attention comes from the registry.

Pre-norm RMSNorm blocks, RoPE, a SwiGLU MLP, no biases, optionally tied embeddings. The model never names
an attention variant: `build_attention` turns the attention config into a module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionConfig, HeadShape, KVCache, Rotary, build_attention, variant_class
from .attention.base import HeadNorm
from .init import InitConfig, resolve_init
from .loss import DEFAULT, LMHead


@dataclass
class ModelConfig:
    name: str = "tiny"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # stored key/value heads; None = n_heads
    kv_heads_per_layer: list[int] | None = None  # overrides n_kv_heads layer by layer (a compressed model's middle layers)
    vocab_size: int | None = None  # None = the tokenizer's vocabulary
    ffn_multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self):
        if isinstance(self.init, dict):  # read back from a saved config (asdict)
            self.init = InitConfig(**self.init)

    def kv_heads(self, layer: int) -> int:
        if self.kv_heads_per_layer:
            return self.kv_heads_per_layer[layer]
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: 8/3 of the model width (as many parameters as a 4x GELU MLP), rounded up."""
        m = self.ffn_multiple_of
        return m * math.ceil(8 * self.dim / 3 / m)


def check_shape(cfg: ModelConfig, any_kv_heads: bool = False) -> None:
    """Raise a one-line ValueError for head counts that do not fit the width.

    Query heads share G key/value heads in equal groups, so G divides H — unless the variant composes its H heads
    from any G stored ones (`any_kv_heads`, MEA's HLC).
    """
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model.n_heads={cfg.n_heads} does not divide model.dim={cfg.dim}; choose n_heads among the divisors of dim")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ValueError(f"model.dim/model.n_heads={cfg.dim // cfg.n_heads} is odd; RoPE needs an even head width")
    allowed = [g for g in range(1, cfg.n_heads + 1) if any_kv_heads or cfg.n_heads % g == 0]
    relation = "exceeds" if any_kv_heads else "does not divide"
    if cfg.n_kv_heads is not None and cfg.n_kv_heads not in allowed:
        raise ValueError(f"model.n_kv_heads={cfg.n_kv_heads} {relation} model.n_heads={cfg.n_heads}; allowed: {allowed} or null")
    if cfg.kv_heads_per_layer is not None:
        if len(cfg.kv_heads_per_layer) != cfg.n_layers or not set(cfg.kv_heads_per_layer) <= set(allowed):
            raise ValueError(f"model.kv_heads_per_layer={list(cfg.kv_heads_per_layer)} needs {cfg.n_layers} entries, each in {allowed} for model.n_heads={cfg.n_heads}")


def check_layers(cfg: ModelConfig, attention: AttentionConfig) -> None:
    """Raise the one-line ValueError that building this model's layers would raise, without allocating them."""
    check_shape(cfg, variant_class(attention.name).any_kv_heads)
    # A variant's own checks of its head shape run in its constructor, and a layer's index sets values, never
    # shapes: one layer of each KV-head count raises whatever all of them would (a 32-layer model built whole on
    # the meta device took 0.2 s, which a spec's plan paid once a run).
    first_of_each_shape = {cfg.kv_heads(i): i for i in reversed(range(cfg.n_layers))}.values()
    with torch.device("meta"):
        for i in first_of_each_shape:
            Block(cfg, attention, i)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """y = W_2 (silu(W_1 x) ⊙ W_3 x), with W_1 and W_3 as one fused projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = build_attention(attention, HeadShape(cfg.dim, cfg.n_heads, cfg.kv_heads(layer_idx)), layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    """cross_entropy: how the loss is computed (mea.models.loss), which changes its cost, not its value."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, cross_entropy: str = DEFAULT):
        super().__init__()
        check_shape(cfg, variant_class(attention.name).any_kv_heads)
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size is not set; it comes from the tokenizer, or set it explicitly")
        self.cfg = cfg
        self.attention_cfg = attention
        self.embed_multiplier = resolve_init(cfg.init, cfg.dim).embed_multiplier
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, attention, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = LMHead(cfg.dim, cfg.vocab_size, cross_entropy)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every weight as `model.init` says (mea/models/init.py); variants' own parameters keep their module's init."""
        init = resolve_init(self.cfg.init, self.cfg.dim)
        nn.init.normal_(self.embed.weight, 0.0, init.embed_std)
        for layer, block in enumerate(self.blocks):
            residual_std = init.residual_std_at(layer, self.cfg.n_layers)
            nn.init.normal_(block.attention.wqkv.weight, 0.0, init.std)
            nn.init.normal_(block.attention.wo.weight, 0.0, residual_std)
            if init.up_as_residual:
                gate, up = block.mlp.w13.weight.chunk(2)
                nn.init.normal_(gate, 0.0, init.std)
                nn.init.normal_(up, 0.0, residual_std)
            else:
                nn.init.normal_(block.mlp.w13.weight, 0.0, init.std)
            nn.init.normal_(block.mlp.w2.weight, 0.0, residual_std)
            for norm in block.attention.modules():
                if isinstance(norm, HeadNorm):
                    norm.weight.fill_(init.head_norm_scale)
        if not self.cfg.tie_embeddings:
            cutoff = (init.head_cutoff or math.inf) * init.head_std
            nn.init.trunc_normal_(self.head.weight, 0.0, init.head_std, -cutoff, cutoff)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens idx_BT, or with targets the mean next-token cross-entropy.

        With caches, idx_BT continues the cached positions."""
        start = caches[0].length if caches else 0
        T = idx_BT.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        rope = Rotary(torch.arange(start, start + T, device=idx_BT.device), self.cfg.rope_theta)
        x = self.embed(idx_BT)
        if self.embed_multiplier != 1.0:
            x = x * self.embed_multiplier
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None)
        return self.head(self.norm(x), targets_BT)

    def new_caches(self, max_len: int | None = None) -> list[KVCache]:
        return [KVCache(max_len or self.cfg.max_seq_len) for _ in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        idx_BT: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after the prompt with a KV cache; temperature 0 is greedy."""
        caches = self.new_caches(idx_BT.shape[1] + max_new_tokens)
        logits = self(idx_BT, caches=caches)[:, -1]
        out = [idx_BT]
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            out.append(nxt)
            logits = self(nxt, caches=caches)[:, -1]
        return torch.cat(out, dim=1)

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.cfg, self.attention_cfg)

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.cfg, self.attention_cfg, seq_len)


def parameter_counts(cfg: ModelConfig, attention: AttentionConfig) -> dict[str, int]:
    """Total and non-embedding parameters of the model the config builds (the latter leaves out the token embedding
    and an untied head). Counted on a copy built on the meta device: what a sharder leaves in the trained model's
    tensors (ZeRO-3's partitions, of numel 0) never enters, and no memory is taken."""
    with torch.device("meta"):
        model = LM(cfg, attention)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.head.weight.numel())
    return {"total": total, "non_embedding": total - embedding}


def flops_per_token(cfg: ModelConfig, attention: AttentionConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's formula 6N + 12·L·H·D·T, where N counts every matmul weight: the
    non-embedding parameters and the LM head's V×C (tied or not); the embedding lookup is no matmul."""
    n_matmul = parameter_counts(cfg, attention)["non_embedding"] + cfg.vocab_size * cfg.dim
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len
