"""Training dynamics: every logged number equals a direct computation, and training logs them at eval steps only."""
import json
import math

import pytest
import torch

from mea.models import LM, ModelConfig
from mea.models.attention import variant_class
from mea.models.attention.base import Rotary, causal_mask
from mea.models.attention.mea import grouped_identity
from mea.models.init import InitConfig
from mea.models.dynamics import measure

from .conftest import QUICK, run_cli


def rms(x):
    return x.square().mean().sqrt().item()


def trained_a_little(variant: str, n_kv_heads: int | None = None) -> LM:
    """A small model whose mixing matrices, norms and λ have left their initial values."""
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6 if variant != "diff" else 4, n_kv_heads=n_kv_heads, init=InitConfig(scheme="llama")),
               variant_class(variant).Config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def direct_probs(attention, x_BTC, rope, variant):
    """Each head's attention distribution from the variant's weights and its paper's equations."""
    H, D = attention.shape.n_heads, attention.shape.head_dim
    G = attention.shape.n_kv_heads
    w_q, w_k, _ = attention.wqkv.weight.split([H * D, G * D, G * D])
    B, T, _ = x_BTC.shape
    q = (x_BTC @ w_q.T).view(B, T, H, D).transpose(1, 2)
    k = (x_BTC @ w_k.T).view(B, T, G, D).transpose(1, 2)
    if variant == "mea":
        k = torch.einsum("bgtd,gh->bhtd", k, attention.hlc_k)
    elif G < H:
        k = k.repeat_interleave(H // G, dim=1)
    mask = causal_mask(T, T, x_BTC.device)
    if variant == "diff":
        half = D // 2
        maps = []
        for part in (slice(0, half), slice(half, D)):
            logits = rope(q[..., part]) @ rope(k[..., part]).transpose(-2, -1) / math.sqrt(half)
            maps.append(logits.masked_fill(~mask, -math.inf).softmax(-1))
        return torch.cat(maps, dim=1)
    logits = (rope(q) @ rope(k).transpose(-2, -1) / math.sqrt(D))
    if variant == "tha":
        logits = torch.einsum("bhts,hj->bjts", logits, attention.mix_logits)
    return logits.masked_fill(~mask, -math.inf).softmax(-1)


@pytest.mark.parametrize("variant, n_kv_heads", [("mha", None), ("mha", 3), ("mha_gn", None), ("diff", None), ("tha", None), ("mea", None), ("mea", 2)])
def test_each_diagnostic_equals_a_direct_computation(variant, n_kv_heads):
    model = trained_a_little(variant, n_kv_heads)
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    row = measure(model, idx)
    rope = Rotary(torch.arange(20), model.cfg.rope_theta)
    x = model.embed(idx) * model.embed_multiplier
    for i, block in enumerate(model.blocks):
        h = block.attention_norm(x)
        a = block.attention(h, rope)
        m = block.mlp(block.mlp_norm(x + a))
        assert row[f"dyn/resid_rms/L{i}"] == pytest.approx(rms(x), rel=1e-5)
        assert row[f"dyn/attn_rms/L{i}"] == pytest.approx(rms(a), rel=1e-5)
        assert row[f"dyn/attn_ratio/L{i}"] == pytest.approx(rms(a) / rms(x), rel=1e-5)
        assert row[f"dyn/mlp_ratio/L{i}"] == pytest.approx(rms(m) / rms(x + a), rel=1e-5)
        probs = direct_probs(block.attention, h, rope, variant)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        assert [row[f"dyn/entropy/L{i}/h{j}"] for j in range(len(entropy))] == pytest.approx(entropy.tolist(), rel=1e-4)
        assert not any(k.startswith(f"dyn/entropy/L{i}/h{len(entropy)}") for k in row)
        attention = block.attention
        if variant in ("mha_gn", "mea", "diff"):
            assert row[f"dyn/head_norm_scale/L{i}"] == pytest.approx(attention.head_norm.weight.abs().mean().item())
        if variant == "mea":
            for side in ("hlc_k", "hlc_v"):
                c, ident = getattr(attention, side), grouped_identity(attention.shape.n_kv_heads, attention.shape.n_heads)
                assert row[f"dyn/{side}_dist/L{i}"] == pytest.approx(torch.linalg.matrix_norm(c - ident).item(), rel=1e-5)
                assert row[f"dyn/{side}_offdiag/L{i}"] == pytest.approx((c.abs() * (1 - ident)).sum().item() / c.abs().sum().item(), rel=1e-5)
        if variant == "tha":
            for name in ("mix_logits", "mix_weights"):
                p = getattr(attention, name)
                assert row[f"dyn/{name}_offdiag/L{i}"] == pytest.approx((p.abs().sum() - p.diagonal().abs().sum()).item() / p.abs().sum().item(), rel=1e-5)
        if variant == "diff":
            lam = math.exp((attention.lambda_q1 @ attention.lambda_k1).item()) - math.exp((attention.lambda_q2 @ attention.lambda_k2).item()) + 0.8 - 0.6 * math.exp(-0.3 * i)
            assert row[f"dyn/lambda/L{i}"] == pytest.approx(lam, rel=1e-5)
        x = x + a + m
    assert row[f"dyn/resid_rms/L{len(model.blocks)}"] == pytest.approx(rms(x), rel=1e-5)


@pytest.mark.parametrize("variant", ["mha", "diff", "tha", "mea"])
def test_the_maps_whose_entropy_is_logged_are_the_ones_the_variant_attends_with(variant):
    """attention_probs reproduces the branch's own output: the entropy describes the attention actually used."""
    model = trained_a_little(variant, 2 if variant == "mea" else None)
    attention, x = model.blocks[1].attention, torch.randn(2, 12, 48)
    rope = Rotary(torch.arange(12), model.cfg.rope_theta)
    probs = attention.attention_probs(x, rope)
    _, _, v = attention.project(x)
    H = attention.shape.n_heads
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    if variant == "diff":
        mixed = probs[:, :H] - attention.lambda_() * probs[:, H:]
    elif variant == "tha":
        mixed = torch.einsum("bhts,hj->bjts", probs, attention.mix_weights)
    else:
        mixed = probs
    torch.testing.assert_close(attention.output(mixed @ v), attention(x, rope), rtol=1e-4, atol=1e-5)


def test_training_logs_dynamics_at_eval_steps_only(tmp_path):
    proc = run_cli("train.py", *QUICK, "attention=mea", "trainer.max_steps=10", "trainer.eval_every=5", f"hydra.run.dir={tmp_path / 'on'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    with_dynamics = [r["step"] for r in rows if "dyn/attn_ratio/L0" in r]
    assert with_dynamics == [r["step"] for r in rows if "val_loss" in r] == [5, 10]
    assert {"dyn/hlc_k_offdiag/L3", "dyn/entropy/L3/h3", "dyn/resid_rms/L4", "dyn/head_norm_scale/L0"} <= set(rows[-1])
    off = run_cli("train.py", *QUICK, "attention=mea", "trainer.max_steps=10", "trainer.eval_every=5", "trainer.dynamics=false", f"hydra.run.dir={tmp_path / 'off'}")
    assert off.returncode == 0 and not any(k.startswith("dyn/") for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines() for k in json.loads(line))
    losses = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("on") == losses("off")  # the pass touches no training state
