"""Weight-decay groups and the learning-rate schedules."""
import math

import pytest
import torch

from mea.config import OptimConfig, SchedulerConfig
from mea.models import LM, ModelConfig
from mea.models.attention.mea import MEAConfig
from mea.train.optim import build_optimizer, lr_factor


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_falls_on_linear_weights_only(decay_embeddings):
    model = LM(ModelConfig(vocab_size=50, n_layers=1), MEAConfig())
    decayed, plain = build_optimizer(model, OptimConfig(decay_embeddings=decay_embeddings)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {"blocks.0.attention.wqkv.weight", "blocks.0.mlp.w13.weight", "head.weight"} <= decayed_names
    assert {"blocks.0.attention.hlc_k", "blocks.0.attention.hlc_v", "blocks.0.attention.head_norm.weight", "norm.weight"} <= plain_names
    assert ("embed.weight" in decayed_names) == decay_embeddings
    assert len(decayed_names) + len(plain_names) == len(list(model.parameters()))


def test_tied_head_counts_as_an_embedding():
    model = LM(ModelConfig(vocab_size=50, n_layers=1, tie_embeddings=True), MEAConfig())
    decayed, _ = build_optimizer(model, OptimConfig()).param_groups
    assert all(p is not model.embed.weight for p in decayed["params"])


def test_schedules():
    cos = SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(cos, s, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(cos, 60, 110) == pytest.approx(0.55)
    assert lr_factor(cos, 110, 110) == pytest.approx(0.1)
    wsd = SchedulerConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [lr_factor(wsd, s, 100) for s in (50, 79)] == [1.0, 1.0]
    assert lr_factor(wsd, 90, 100) == pytest.approx(0.5) and lr_factor(wsd, 100, 100) == 0.0
    const = SchedulerConfig(name="constant", warmup_steps=4)
    assert lr_factor(const, 1, 100) == 0.5 and lr_factor(const, 99, 100) == 1.0
    assert all(math.isfinite(lr_factor(cos, s, 10)) for s in range(12))  # warmup as long as the run


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    from .test_trainer import plain_engine

    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    whole, split = plain_engine(tmp_path), plain_engine(tmp_path)
    split.micro_batch = 2
    for _ in range(3):
        a, b = whole.train_step(x, x), split.train_step(x, x)
        assert a == pytest.approx(b, rel=1e-5)
    for (n, p), q in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
