"""Each variant against the others where the maths says they coincide, and against its own equations."""
import math
import re

import pytest
import torch

from mea.models import LM, REGISTRY, ModelConfig
from mea.models.attention.diff import DiffConfig
from mea.models.attention.base import causal_mask
from mea.models.attention.mea import MEAConfig, attention_by_matmuls
from mea.models.attention.mha import MHAConfig
from mea.models.attention.tha import TalkingHeadsConfig

VOCAB = 97
# fast paths are checked against their references on the CPU always, and on a GPU where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def model(attention, n_kv_heads=None, seed=0, n_layers=2, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=n_layers, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=VOCAB, max_seq_len=64, **kw)
    return LM(cfg, attention).eval()


def tokens(B=2, T=24, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def all_variants():
    configs = [cls.Config() for cls in REGISTRY.values()]
    configs += [DiffConfig(norm=False), DiffConfig(pair_heads=True), MEAConfig(hlc_init="random"), MEAConfig(fold_hlc=False, hlc_init="random")]
    return configs


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_mea_with_identity_hlc_and_no_norm_is_mha(n_kv_heads):
    mha = model(MHAConfig(), n_kv_heads)
    mea = model(MEAConfig(hlc_init="identity", norm=False), n_kv_heads, seed=5)
    missing, unexpected = mea.load_state_dict(mha.state_dict(), strict=False)
    assert unexpected == [] and all("hlc" in k for k in missing) and missing
    x = tokens()
    torch.testing.assert_close(mea(x), mha(x), rtol=0, atol=1e-5)


def test_mea_differs_from_mha_once_heads_mix():
    mha = model(MHAConfig())
    mea = model(MEAConfig(hlc_init="random", norm=False))
    mea.load_state_dict(mha.state_dict(), strict=False)
    x = tokens()
    assert (mea(x) - mha(x)).abs().max() > 1e-3


def test_tha_with_identity_mixing_is_mha():
    mha = model(MHAConfig())
    tha = model(TalkingHeadsConfig(), seed=3)
    tha.load_state_dict(mha.state_dict(), strict=False)
    x = tokens()
    torch.testing.assert_close(tha(x), mha(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        tha.blocks[0].attention.mix_logits.add_(0.3 * torch.randn(8, 8))
    assert (tha(x) - mha(x)).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [None, 4, 1])
def test_folded_hlc_equals_explicit_composition(n_kv_heads, device):
    folded = model(MEAConfig(hlc_init="random"), n_kv_heads).to(device)
    explicit = model(MEAConfig(hlc_init="random", fold_hlc=False), n_kv_heads, seed=9).to(device)
    explicit.load_state_dict(folded.state_dict())
    x = tokens().to(device)
    torch.testing.assert_close(folded(x), explicit(x), rtol=1e-4, atol=1e-5)
    # gradients reach the HLC matrices identically through both forms
    for m in (folded, explicit):
        m(x[:, :-1], x[:, 1:]).backward()
    g1, g2 = folded.blocks[1].attention.hlc_k.grad, explicit.blocks[1].attention.hlc_k.grad
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_head_norm_is_torch_group_norm_with_one_group_per_head(device):
    """mha_gn = W_O GroupNorm_H(o) with torch's own GroupNorm as the reference: the per-channel scale, folded
    into W_O in the module, must land on the right head and channel."""
    from mea.models.attention.base import HeadShape, Rotary, causal_attention
    from mea.models.attention.mha_gn import MHAGroupNormConfig, MultiHeadAttentionGroupNorm

    torch.manual_seed(0)
    C, H, T = 32, 4, 10
    attn = MultiHeadAttentionGroupNorm(MHAGroupNormConfig(), HeadShape(C, H, H), 0)
    with torch.no_grad():
        attn.head_norm.weight.copy_(torch.rand_like(attn.head_norm.weight) + 0.5)
    x, pos = torch.randn(2, T, C), torch.arange(T)
    y = on(device, attn, x, pos)
    rope = Rotary(pos, 10000.0)
    q, k, v = attn.project(x)
    o = causal_attention(rope(q), rope(k), v).transpose(1, 2).reshape(2 * T, C)
    expected = torch.nn.functional.group_norm(o, H, attn.head_norm.weight.flatten(), eps=1e-5) @ attn.wo.weight.T
    torch.testing.assert_close(y, expected.view(2, T, C), rtol=1e-4, atol=1e-5)


def on(device, attn, x, pos):
    """The layer's output computed on `device`, back on the CPU, and the layer left there for the reference."""
    from mea.models.attention.base import Rotary

    y = attn.to(device)(x.to(device), Rotary(pos.to(device), 10000.0)).cpu()
    attn.cpu()
    return y


def rope_ref(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** -(torch.arange(0, d, 2).float() / d)
    ang = positions.float()[:, None] * inv
    x1, x2 = x[..., 0::2], x[..., 1::2]  # channel pairs (2i, 2i+1) turn by angle i
    return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1).flatten(-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm, layer, pair_heads", [(True, 0, False), (False, 3, False), (True, 3, True), (False, 0, True)])
def test_diff_equals_its_equations(norm, layer, pair_heads, device):
    """A direct transcription of Ye et al.'s equations, with explicit softmax maps; pair_heads=true is the same
    with H/2 heads of twice the width."""
    from mea.models.attention.base import HeadShape
    from mea.models.attention.diff import DifferentialAttention

    torch.manual_seed(0)
    C, H, T = 32, 4, 10
    attn = DifferentialAttention(DiffConfig(norm=norm, pair_heads=pair_heads), HeadShape(C, H, H), layer)
    if pair_heads:
        H = H // 2
    D = C // H
    with torch.no_grad():
        if norm:
            attn.head_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, T, C)
    pos = torch.arange(T)
    y = on(device, attn, x, pos)

    Wq, Wk, Wv = attn.wqkv.weight.split([H * D, H * D, H * D])
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * ((layer + 1) - 1))
    lam = (
        torch.exp((attn.lambda_q1 * attn.lambda_k1).sum())
        - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum())
        + lam_init
    )
    causal = torch.ones(T, T).tril().bool()
    heads = []
    for h in range(H):
        q = (x @ Wq.T)[..., h * D : (h + 1) * D]
        k = (x @ Wk.T)[..., h * D : (h + 1) * D]
        v = (x @ Wv.T)[..., h * D : (h + 1) * D]
        q1, q2 = rope_ref(q[..., : D // 2], pos), rope_ref(q[..., D // 2 :], pos)
        k1, k2 = rope_ref(k[..., : D // 2], pos), rope_ref(k[..., D // 2 :], pos)
        a1 = (q1 @ k1.transpose(-1, -2) / math.sqrt(D / 2)).masked_fill(~causal, -math.inf).softmax(-1)
        a2 = (q2 @ k2.transpose(-1, -2) / math.sqrt(D / 2)).masked_fill(~causal, -math.inf).softmax(-1)
        o = (a1 - lam * a2) @ v
        if norm:
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.head_norm.weight[h, 0] * (1 - lam_init)
        heads.append(o)
    expected = torch.cat(heads, dim=-1) @ attn.wo.weight.T
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_tha_equals_its_equations(n_kv_heads, device):
    """Shazeer et al.'s equations head by head, with random (non-symmetric) mixing matrices and GQA."""
    from mea.models.attention.base import HeadShape
    from mea.models.attention.tha import TalkingHeadsAttention

    torch.manual_seed(0)
    C, H, D, T = 32, 4, 8, 10
    attn = TalkingHeadsAttention(TalkingHeadsConfig(), HeadShape(C, H, n_kv_heads), 0)
    with torch.no_grad():
        attn.mix_logits.copy_(torch.randn(H, H))
        attn.mix_weights.copy_(torch.randn(H, H))
    x, pos = torch.randn(2, T, C), torch.arange(T)
    y = on(device, attn, x, pos)

    Wq, Wk, Wv = attn.wqkv.weight.split([H * D, n_kv_heads * D, n_kv_heads * D])
    head = lambda W, h: (x @ W.T)[..., h * D : (h + 1) * D]  # noqa: E731
    kv_of = lambda h: h * n_kv_heads // H  # noqa: E731
    logits = [rope_ref(head(Wq, h), pos) @ rope_ref(head(Wk, kv_of(h)), pos).transpose(-1, -2) / math.sqrt(D) for h in range(H)]
    causal = torch.ones(T, T).tril().bool()
    maps = [sum(attn.mix_logits[h, j] * logits[h] for h in range(H)).masked_fill(~causal, -math.inf).softmax(-1) for j in range(H)]
    outs = [sum(attn.mix_weights[i, j] * maps[i] for i in range(H)) @ head(Wv, kv_of(j)) for j in range(H)]
    torch.testing.assert_close(y, torch.cat(outs, dim=-1) @ attn.wo.weight.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("attention", all_variants(), ids=lambda c: f"{c.name}-{c}")
def test_cached_decoding_equals_full_forward(attention, n_kv_heads, device):
    m = model(attention, n_kv_heads)
    with torch.no_grad():  # make heads really talk, so a wrong cache path cannot hide behind an identity
        for name, p in m.named_parameters():
            if any(part in name for part in ("hlc", "mix", "norm", "lambda")):
                p.add_(0.1 * torch.randn_like(p))
    m, x = m.to(device), tokens(T=24).to(device)
    full = m(x)
    caches = m.new_caches()
    # a prefill past DECODE_QUERIES (mea's compressed cache: the fused kernel), a short chunk and single tokens (on a GPU, batched matmuls)
    steps = [m(x[:, :17], caches=caches), m(x[:, 17:20], caches=caches)] + [m(x[:, t : t + 1], caches=caches) for t in range(20, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=2e-5)



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T", [1, 3])
def test_decoding_by_matmuls_equals_the_fused_kernel(T, dtype, tolerance, device):
    """A GPU's absorbed decode (two batched matmuls over the cache, which a CPU never takes) against the fused
    kernel in fp32, for one new token and a short chunk under its causal mask, over a cache read as a slice of a
    longer buffer, as KVCache hands it out."""
    torch.manual_seed(0)
    B, H, S, X = 2, 4, 40, 24
    q = torch.randn(B, H * T, X, device=device)
    k, v = (torch.randn(B, S + 5, X, device=device)[:, :S] for _ in range(2))
    mask = None if T == 1 else causal_mask(T, S, torch.device(device)).repeat(H, 1)
    fused = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask, scale=X**-0.5)[:, 0]
    by_matmuls = attention_by_matmuls(q.to(dtype), k.to(dtype), v.to(dtype), mask, X**-0.5)
    assert by_matmuls.dtype == dtype
    torch.testing.assert_close(by_matmuls.float(), fused, rtol=tolerance, atol=tolerance)
    if T > 1:  # the mask is applied: the first query of the chunk differs when it may see the last keys
        unmasked = attention_by_matmuls(q, k, v, None, X**-0.5)
        assert not torch.allclose(unmasked[:, :1], fused[:, :1], atol=1e-3)

def test_mea_composes_its_heads_from_any_number_of_stored_ones():
    """HLC maps G stored heads to H for any G <= H (3 of 8 here), in training and in the absorbed decode;
    variants whose heads share key/value heads in groups still need G to divide H."""
    m = model(MEAConfig(hlc_init="random"), n_kv_heads=3)
    x = tokens(T=12)
    caches = m.new_caches()
    steps = [m(x[:, :5], caches=caches)] + [m(x[:, t : t + 1], caches=caches) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), m(x), rtol=1e-4, atol=2e-5)
    assert caches[0].k.shape[-1] == 3 * 8  # the cache holds the 3 stored heads of width 8 side by side
    with pytest.raises(ValueError, match=re.escape("model.n_kv_heads=3 does not divide model.n_heads=8; allowed: [1, 2, 4, 8] or null")):
        model(MHAConfig(), n_kv_heads=3)


@pytest.mark.parametrize("attention", all_variants(), ids=lambda c: f"{c.name}-{c}")
def test_causality(attention):
    m = model(attention, n_kv_heads=4)
    x = tokens(T=16)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % VOCAB
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 0


def test_mea_cache_holds_only_stored_heads():
    full, half = model(MEAConfig(), None), model(MEAConfig(), 4)
    sizes = []
    for m in (full, half):
        caches = m.new_caches()
        m(tokens(T=12), caches=caches)
        sizes.append(sum(c.nbytes for c in caches))
    assert sizes[1] * 2 == sizes[0]


def test_generate_is_deterministic_and_greedy_matches_argmax():
    m = model(MEAConfig(), 4)
    prompt = tokens(B=1, T=5)
    out = m.generate(prompt, 6, temperature=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    assert out[0, 5] == m(prompt)[0, -1].argmax()
    assert torch.equal(out[:, 6:], m.generate(out[:, :6], 5, temperature=0)[:, 6:])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(m.generate(prompt, 8, top_k=5, generator=g()), m.generate(prompt, 8, top_k=5, generator=g()))


@pytest.mark.parametrize("center", [True, False])
def test_norm_then_project_backward_is_exact(center):
    """The hand-written backward, which rebuilds norm(o) from o, against finite differences (float64), with o in
    the transposed layout the attention kernel hands over."""
    from mea.models.attention.base import NormThenProject

    torch.manual_seed(0)
    o_BHTD = torch.randn(2, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, w: NormThenProject.apply(o.transpose(1, 2), w, center, 1e-5), (o_BHTD, w))


@pytest.mark.parametrize("variant", ["mha_gn", "mea"])
def test_head_norm_keeps_no_activation_more_than_mha(variant):
    """For backward a normed layer keeps what `mha`'s keeps plus its folded weights and two statistics per head
    and position — not the normalised heads, which backward rebuilds."""
    from bench.train_step import saved_activation_bytes
    from mea.models.attention.base import HeadShape, Rotary

    B, T, C, H = 2, 64, 64, 4
    shape, x, rope = HeadShape(C, H, H), torch.randn(B, T, C, requires_grad=True), Rotary(torch.arange(T), 10000.0)
    kept = {name: saved_activation_bytes(REGISTRY[name](REGISTRY[name].Config(), shape, 0), x, rope) for name in ("mha", variant)}
    folded_weights = (4 if variant == "mea" else 1) * C * C * 4  # W_O, and for mea the whole QKV projection
    activation = B * T * C * 4
    assert 0 < kept[variant] - kept["mha"] - folded_weights < activation / 4  # statistics: 2 of every D = 16 values


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_tha_over_query_blocks_equals_the_whole_maps(n_kv_heads):
    """Blocks of 8 of 20 queries (the last one short), each reading the keys it can see and recomputed in backward:
    the output, every gradient and cached decoding equal the whole maps'."""
    from mea.models.attention.tha import TalkingHeadsAttention

    whole, blocked = (model(TalkingHeadsConfig(), n_kv_heads) for _ in range(2))
    with torch.no_grad():
        for m in (whole, blocked):  # heads that talk
            for block in m.blocks:
                block.attention.mix_logits.add_(0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(5)))
                block.attention.mix_weights.add_(0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(6)))
    for block in blocked.blocks:
        block.attention.query_block = 8
    assert TalkingHeadsAttention.query_block >= 20  # `whole` computes each head's 20×20 map at once
    x = tokens(T=20)
    torch.testing.assert_close(blocked(x, x), whole(x, x), rtol=0, atol=0)
    for m in (whole, blocked):
        m(x, x).backward()
    for (name, a), b in zip(whole.named_parameters(), blocked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    caches = blocked.new_caches()
    steps = [blocked(x[:, :3], caches=caches), blocked(x[:, 3:20], caches=caches)]  # 17 new queries over 20 keys: 3 blocks
    torch.testing.assert_close(torch.cat(steps, dim=1), whole(x), rtol=1e-5, atol=1e-6)


def compiled_against_eager(attention, **kw) -> None:
    """One graph (fullgraph=True: a break is an error) for the loss, forward and backward, against eager, every
    block under the trainer's activation checkpointing (where a side effect in a block is a graph break)."""
    from mea.train.engine import apply_activation_checkpointing

    m = model(attention, **kw).train()
    apply_activation_checkpointing(m)
    for block in m.blocks:  # THA's blocks of queries, checkpointed, in the graph too
        block.attention.query_block = 8
    x = tokens(T=25)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    reference = m(x[:, :-1], x[:, 1:])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, p in m.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", all_variants(), ids=lambda c: f"{c.name}-{c}")
def test_every_variant_compiles_to_one_graph(attention):
    """Dynamo and AOT autograd, as the trainer's torch.compile runs them, with the eager backend: tracing and graph
    breaks do not depend on the backend, and inductor's code generation for every variant takes ~2 minutes here
    (measured once within 1e-8 of eager for each; in the suite, test_trainer's compiled run is inductor's)."""
    torch._dynamo.reset()
    compiled_against_eager(attention, n_kv_heads=2, n_layers=1)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_compiles_to_real_arithmetic_equal_to_the_complex_turn(device):
    """Under inductor the rotation is real arithmetic it fuses (inductor warns when it meets a complex op it
    cannot generate code for, as the complex multiply was), equal to eager's complex multiply, forward and back."""
    import warnings

    from mea.models.attention.base import Rotary

    torch._dynamo.reset()
    x = torch.randn(2, 3, 40, 16, device=device, requires_grad=True)
    rope = Rotary(torch.arange(40, device=device), 10000.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        turned = torch.compile(lambda x: rope(x), fullgraph=True)(x)
    assert not [w for w in said if "complex" in str(w.message)], [str(w.message) for w in said]
    grad = torch.autograd.grad(turned.square().sum(), x)[0]
    reference = rope(x)
    torch.testing.assert_close(turned, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(reference.square().sum(), x)[0], rtol=1e-6, atol=1e-6)


def test_tha_keeps_under_twice_what_mha_keeps_at_t_2048():
    """What a step saves for backward at the GPU preset's length: with the maps recomputed per block of queries it
    stays of the order of `mha`'s, instead of growing with T² (6.9× at T 2048 before)."""
    from bench.train_step import saved_activation_bytes
    from mea.models.attention.base import HeadShape, Rotary

    B, T, C, H = 1, 2048, 64, 4
    shape, x, rope = HeadShape(C, H, H), torch.randn(B, T, C, requires_grad=True), Rotary(torch.arange(T), 10000.0)
    kept = {name: saved_activation_bytes(REGISTRY[name](REGISTRY[name].Config(), shape, 0), x, rope) for name in ("mha", "tha")}
    assert kept["tha"] <= 2 * kept["mha"], kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("center", [True, False])
def test_norm_then_project_under_bf16_autocast_matches_torch_norms(center, device):
    from mea.models.attention.base import NormThenProject

    torch.manual_seed(0)
    o = torch.randn(2, 16, 4, 32, device=device, requires_grad=True)
    w = torch.randn(64, 128, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = NormThenProject.apply(o, w, center, 1e-5)
        norm = torch.nn.functional.layer_norm if center else torch.nn.functional.rms_norm
        y_ref = torch.nn.functional.linear(norm(o, (32,), eps=1e-5).flatten(-2), w)
    g = torch.randn_like(y)
    grads, grads_ref = torch.autograd.grad(y, (o, w), g), torch.autograd.grad(y_ref, (o, w), g)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", all_variants(), ids=lambda c: f"{c.name}-{c}")
def test_every_variant_under_bf16_autocast_tracks_fp32(attention, device):
    """The mixed-precision path (bf16 matmuls; the head norm's hand-written backward; the cached and, for mea with
    G < H, absorbed decode) against fp32: losses within 0.1%, every gradient within cosine 0.999, logits of the
    cached decode within bf16's resolution of the full forward's."""
    m, x = model(attention, n_kv_heads=4).to(device), tokens(T=20).to(device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(part in name for part in ("hlc", "mix", "norm", "lambda")):
                p.add_(0.1 * torch.randn_like(p))
    grads = {}
    for precision in ("fp32", "bf16"):
        m.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = m(x, x)
        loss.backward()
        grads[precision] = (loss.item(), {n: p.grad.float().flatten() for n, p in m.named_parameters() if p.grad is not None})
    (loss32, g32), (loss16, g16) = grads["fp32"], grads["bf16"]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-3)
    for name, g in g32.items():
        if g.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g16[name], g, dim=0) > 0.999, name
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        full = m(x)
        caches = m.new_caches()
        steps = [m(x[:, :7], caches=caches)] + [m(x[:, t : t + 1], caches=caches) for t in range(7, 20)]
    assert full.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full.float(), rtol=0, atol=1e-2)
