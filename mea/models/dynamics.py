"""Training dynamics at eval steps: why a variant trains differently, not only that it does.

One extra forward pass, without gradients, on a few validation sequences, with hooks that live only for that
pass (the training steps never see them). Per layer l, into metrics.jsonl and W&B as `dyn/<quantity>/L<l>`:

    resid_rms     RMS of the residual stream entering layer l (L<n_layers>: leaving the last layer)
    attn_rms      RMS of the attention branch's output; attn_ratio = attn_rms / resid_rms, the stream it joins
    mlp_rms       RMS of the MLP branch's output; mlp_ratio = mlp_rms / RMS of the stream it joins
    entropy/h<j>  mean entropy (nats) of head j's attention distribution over the keys
    ...           the variant's own numbers (its `dynamics()`): head_norm_scale (mean |γ|), MEA's
                  hlc_{k,v}_{dist,offdiag}, THA's mix_{logits,weights}_{dist,offdiag}, DIFF's lambda

At initialisation the branch outputs are nearly uncorrelated with the stream, so each layer multiplies the
stream's variance by about 1 + attn_ratio², and the token embedding's share of the last layer's stream is about
1 / Π_l (1 + attn_ratio_l²)(1 + mlp_ratio_l²).
"""
from __future__ import annotations

import torch

from .transformer import LM

DYNAMICS_SEQUENCES = 4  # sequences of the validation set in the pass: the attention maps are (B, H, T, T)


def rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


@torch.no_grad()
def measure(model: LM, idx_BT: torch.Tensor) -> dict[str, float]:
    """The dynamics of `model` on the token windows idx_BT, keyed `dyn/<quantity>/L<layer>`."""
    seen: dict[tuple[int, str], object] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks += [
            block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__((i, "stream"), args[0])),
            block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__((i, "out"), out)),
            block.attention.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__((i, "attention_in"), args[:2])),
            block.attention.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__((i, "attention"), out)),
            block.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__((i, "mlp"), out)),
        ]
    try:
        model(idx_BT)
    finally:
        for hook in hooks:
            hook.remove()
    row: dict[str, float] = {}
    for i, block in enumerate(model.blocks):
        stream, attention, mlp = seen[i, "stream"], seen[i, "attention"], seen[i, "mlp"]
        row[f"dyn/resid_rms/L{i}"] = rms(stream)
        row[f"dyn/attn_rms/L{i}"] = rms(attention)
        row[f"dyn/attn_ratio/L{i}"] = rms(attention) / rms(stream)
        row[f"dyn/mlp_rms/L{i}"] = rms(mlp)
        row[f"dyn/mlp_ratio/L{i}"] = rms(mlp) / rms(stream + attention)
        for name, value in block.attention.dynamics().items():
            row[f"dyn/{name}/L{i}"] = value
        probs_BHTS = block.attention.attention_probs(*seen[i, "attention_in"]).float()
        entropy_H = -(probs_BHTS * probs_BHTS.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        row |= {f"dyn/entropy/L{i}/h{h}": e for h, e in enumerate(entropy_H.tolist())}
    row[f"dyn/resid_rms/L{len(model.blocks)}"] = rms(seen[len(model.blocks) - 1, "out"])
    return row
