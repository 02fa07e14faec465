"""Initialisation schemes of the LM: how every variant's weights start, one scheme for all of them.

Parameter families, each drawn from N(0, σ):
    embedding    the token embedding, multiplied by `embed_multiplier` in the forward pass
    hidden       the input projections of attention (W_QKV) and MLP (W_1, W_3)
    residual     the output projections that write into the residual stream (W_O, W_2)
    head         the LM head (untied)
    head norm    the scale γ of a variant's per-head norm (`mha_gn`, `mea`, `diff`), a constant: `head_norm_scale`,
                 0.05 in every scheme unless set. A normalised head has unit RMS where an un-normalised head's
                 output (a weighted mean of value vectors) is far smaller: at γ = 1 the head-norm variants start
                 by writing several times the residual stream into it (under gpt2, about 4× in the first layer at
                 width 128), at γ = 0.05 at the scale `mha` does. docs/results/init_audit.md measured the choice.
A variant's own parameters (HLC, talking-heads mixing, DIFF's λ) keep the init its module documents. With
tied embeddings the head is the embedding and keeps the embedding's σ: under `llama` (σ = 1) the logits start
√C times larger than with its own head; `scaled_embed` suits tied embeddings.

Schemes (a knob set explicitly overrides the scheme's value):
    gpt2          σ = 0.02 everywhere, residual σ/√(2L). Radford et al. 2019 (GPT-2, §2.3), nanoGPT's
                  `_init_weights`. The residual stream starts at 0.02 per channel. The default.
    llama         embeddings N(0, 1); hidden 0.02; residual 0.02/√(2(l+1)) in layer l = 0 … L−1 (torchtitan's
                  `depth_init`), the MLP's up projection W_3 too; head N(0, 1/√C) cut at ±3σ. torchtitan
                  `models/llama3/model.py`, `init_weights`. The residual stream starts at unit scale.
    scaled_embed  embeddings N(0, 1/√C) times √C in the forward pass (Vaswani et al. 2017 §3.4, fairseq's
                  `embed_scale`, torchscale; Gemma multiplies by √C); otherwise gpt2. A unit-scale residual
                  stream whose embedding the optimizer moves on the same scale as the other weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

SCHEMES = ("gpt2", "llama", "scaled_embed")
RESIDUAL_SCALINGS = ("depth", "layer", "none")


@dataclass
class InitConfig:
    scheme: str = "gpt2"
    std: float | None = None  # hidden projections; None = the scheme's
    embed_std: float | None = None
    embed_multiplier: float | None = None  # times the embedding output; None = the scheme's (1, or √C for scaled_embed)
    residual_scaling: str | None = None  # depth: σ/√(2L) | layer: σ/√(2(l+1)) | none: σ
    residual_std: float | None = None  # σ of the residual outputs before the scaling; None = std
    head_std: float | None = None
    head_norm_scale: float = 0.05  # initial γ of every per-head norm (the init audit's choice; 1 before it)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"model.init.scheme={self.scheme!r} is not a known scheme; choose one of: {', '.join(SCHEMES)}")
        if self.residual_scaling is not None and self.residual_scaling not in RESIDUAL_SCALINGS:
            raise ValueError(f"model.init.residual_scaling={self.residual_scaling!r} is not allowed; choose one of: {', '.join(RESIDUAL_SCALINGS)} or null")
        for key in ("std", "embed_std", "embed_multiplier", "residual_std", "head_std", "head_norm_scale"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"model.init.{key}={value} must be positive (or null for the scheme's value)")


@dataclass(frozen=True)
class ResolvedInit:
    """Every family's σ for a model of width C and L layers, the scheme's values under the knobs set."""

    embed_std: float
    embed_multiplier: float
    std: float
    residual_std: float
    residual_scaling: str
    head_std: float
    head_norm_scale: float
    up_as_residual: bool  # W_3 drawn as a residual output (torchtitan)
    head_cutoff: float | None  # the head's normal cut at ± this many σ

    def residual_std_at(self, layer: int, n_layers: int) -> float:
        divisor = {"depth": 2 * n_layers, "layer": 2 * (layer + 1), "none": 1}[self.residual_scaling]
        return self.residual_std / math.sqrt(divisor)


def resolve_init(cfg: InitConfig, dim: int) -> ResolvedInit:
    base = {
        "gpt2": ResolvedInit(0.02, 1.0, 0.02, 0.02, "depth", 0.02, 1.0, False, None),
        "llama": ResolvedInit(1.0, 1.0, 0.02, 0.02, "layer", dim**-0.5, 1.0, True, 3.0),
        "scaled_embed": ResolvedInit(dim**-0.5, dim**0.5, 0.02, 0.02, "depth", 0.02, 1.0, False, None),
    }[cfg.scheme]
    knobs = {key: getattr(cfg, key) for key in ("embed_std", "embed_multiplier", "std", "residual_scaling", "head_std")}
    resolved = replace(base, **{k: v for k, v in knobs.items() if v is not None}, head_norm_scale=cfg.head_norm_scale)
    return replace(resolved, residual_std=cfg.residual_std or cfg.std or base.residual_std)
