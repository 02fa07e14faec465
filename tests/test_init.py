"""Initialisation schemes: each parameter family's statistics, the knobs, and the start every variant gets."""
import math

import pytest
import torch

from mea.models import LM, ModelConfig
from mea.models.attention import REGISTRY, variant_class
from mea.models.attention.base import HeadNorm
from mea.models.init import InitConfig
from mea.models.dynamics import measure

WIDTH, LAYERS = 256, 4


def build(variant: str = "mha", seed: int = 0, **init) -> LM:
    torch.manual_seed(seed)
    return LM(ModelConfig(vocab_size=4096, dim=WIDTH, n_layers=LAYERS, n_heads=4, init=InitConfig(**init)), variant_class(variant).Config())


def family_stds(model: LM) -> dict[str, float]:
    """σ of each parameter family as drawn (layer by layer for the depth-scaled ones)."""
    stds = {"embedding": model.embed.weight.std().item(), "head": model.head.weight.std().item()}
    for i, block in enumerate(model.blocks):
        gate, up = block.mlp.w13.weight.chunk(2)
        stds |= {f"wqkv.{i}": block.attention.wqkv.weight.std().item(), f"gate.{i}": gate.std().item(), f"up.{i}": up.std().item(),
                 f"wo.{i}": block.attention.wo.weight.std().item(), f"w2.{i}": block.mlp.w2.weight.std().item()}
    return stds


def expected_stds(embedding: float, hidden: float, head: float, residual, up_as_residual: bool = False) -> dict[str, float]:
    out = {"embedding": embedding, "head": head}
    for i in range(LAYERS):
        out |= {f"wqkv.{i}": hidden, f"gate.{i}": hidden, f"up.{i}": residual(i) if up_as_residual else hidden, f"wo.{i}": residual(i), f"w2.{i}": residual(i)}
    return out


SCHEMES = {
    "gpt2": ({}, expected_stds(0.02, 0.02, 0.02, lambda i: 0.02 / math.sqrt(2 * LAYERS))),
    # the head: N(0, 1/√C) cut at ±3σ keeps 98.5% of the variance
    "llama": ({}, expected_stds(1.0, 0.02, WIDTH**-0.5 * 0.9867, lambda i: 0.02 / math.sqrt(2 * (i + 1)), up_as_residual=True)),
    "scaled_embed": ({}, expected_stds(WIDTH**-0.5, 0.02, 0.02, lambda i: 0.02 / math.sqrt(2 * LAYERS))),
    "gpt2 + knobs": ({"embed_std": 0.5, "std": 0.01, "residual_scaling": "none", "head_std": 0.1},
                     expected_stds(0.5, 0.01, 0.1, lambda i: 0.01)),
    "llama + knobs": ({"residual_std": 0.04, "residual_scaling": "depth"}, expected_stds(1.0, 0.02, WIDTH**-0.5 * 0.9867, lambda i: 0.04 / math.sqrt(2 * LAYERS), up_as_residual=True)),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_parameter_family_has_its_schemes_std(name):
    knobs, expected = SCHEMES[name]
    model = build(scheme=name.split()[0], **knobs)
    measured = family_stds(model)
    for family, std in expected.items():  # ≥ 16k samples a family: the sample std is within 2% of σ
        assert measured[family] == pytest.approx(std, rel=0.03), family
    if name.startswith("llama"):
        assert model.head.weight.abs().max() <= 3 * WIDTH**-0.5 + 1e-6


def test_embedding_multiplier_and_head_norm_scale():
    model = build("mea", scheme="scaled_embed", head_norm_scale=0.25)
    idx = torch.randint(0, 4096, (2, 16))
    stream = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: stream.update(x=args[0]))
    model(idx)
    assert torch.allclose(stream["x"], model.embed(idx) * WIDTH**0.5)
    assert stream["x"].std().item() == pytest.approx(1.0, rel=0.05)  # a unit-scale stream, as llama's
    norms = [m for m in model.modules() if isinstance(m, HeadNorm)]
    assert len(norms) == LAYERS and all(torch.all(n.weight == 0.25) for n in norms)
    assert build("mea", embed_multiplier=3.0).embed_multiplier == 3.0 and build("mha").embed_multiplier == 1.0


def test_every_variant_starts_from_the_same_scheme():
    """The shared families are drawn alike whatever the variant: nothing in the init branches on its name."""
    reference = family_stds(build("mha", scheme="llama"))
    for variant in REGISTRY:
        for family, std in family_stds(build(variant, scheme="llama")).items():
            assert std == pytest.approx(reference[family], rel=0.04), (variant, family)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"scheme": "xavier"}, "model.init.scheme='xavier' is not a known scheme; choose one of: gpt2, llama, scaled_embed"),
        ({"std": 0.0}, "model.init.std=0.0 must be positive"),
        ({"embed_std": -1.0}, "model.init.embed_std=-1.0 must be positive"),
        ({"residual_scaling": "sqrt"}, "model.init.residual_scaling='sqrt' is not allowed; choose one of: depth, layer, none or null"),
    ],
)
def test_bad_init_settings_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InitConfig(**knobs)


@pytest.mark.parametrize("variant", sorted(REGISTRY))
def test_under_the_default_no_attention_branch_dominates_the_stream_at_initialisation(variant):
    """The bound: a branch output nearly uncorrelated with the stream multiplies its variance by 1 + r² (r: the
    branch-to-stream RMS ratio), so Π_l (1 + r_l²) ≤ 2 keeps at least half of the last layer's stream the token
    embedding, and r_l < 1 keeps every layer's branch smaller than the stream it joins. Under the GPT-2 scheme the
    head-norm variants break it from the first layer (r ≈ 4: unit-variance heads written into a 0.02 stream)."""
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=2048), variant_class(variant).Config())  # the default tiny model and init
    row = measure(model, torch.randint(0, 2048, (4, 128)))
    ratios = [row[f"dyn/attn_ratio/L{i}"] for i in range(model.cfg.n_layers)]
    assert max(ratios) < 1 and math.prod(1 + r * r for r in ratios) <= 2, ratios


def test_head_norms_started_at_one_swamp_the_stream():
    """The mechanism behind the bound, measured: the earlier default (gpt2, γ = 1) lets the normalised heads
    dominate layer 0, and γ = 0.05 brings them to the scale of mha's un-normalised heads."""
    ratio = {}
    for variant, gamma in (("mea", 1.0), ("mea", 0.05), ("mha", 1.0)):
        torch.manual_seed(0)
        model = LM(ModelConfig(vocab_size=2048, init=InitConfig(scheme="gpt2", head_norm_scale=gamma)), variant_class(variant).Config())
        ratio[variant, gamma] = measure(model, torch.randint(0, 2048, (4, 128)))["dyn/attn_ratio/L0"]
    assert ratio["mea", 1.0] > 2 and 0.5 < ratio["mea", 0.05] / ratio["mha", 1.0] < 2
