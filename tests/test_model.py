"""Size presets and model-shape errors."""
import re

import pytest
import torch
from omegaconf import OmegaConf

from mea.models import LM, ModelConfig
from mea.models.attention.mha import MHAConfig

from .conftest import ROOT, compose_config

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
SCALE = {"m": 1e6, "b": 1e9}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])
def test_size_preset_is_named_by_its_non_embedding_parameter_count(preset, tmp_path):
    cfg = compose_config(tmp_path, f"model={preset}", "attention=mha")
    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.vocab_size = 32
    with torch.device("meta"):  # counts need no memory
        counts = LM(model_cfg, MHAConfig()).parameter_counts()
    number, unit = re.fullmatch(r"([\d.]+)([mb])", preset).groups()
    assert counts["non_embedding"] == pytest.approx(float(number) * SCALE[unit], rel=0.05)


def test_presets_span_tiny_to_1_3b():
    assert {"tiny", "25m", "125m", "350m", "760m", "1.3b"} <= set(PRESETS)


def test_parameter_counts_separate_embeddings():
    untied = LM(ModelConfig(vocab_size=1000), MHAConfig()).parameter_counts()
    tied = LM(ModelConfig(vocab_size=1000, tie_embeddings=True), MHAConfig()).parameter_counts()
    assert untied["non_embedding"] == tied["non_embedding"]
    assert untied["total"] - tied["total"] == 1000 * 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_heads": 5}, "model.n_heads=5 does not divide model.dim=128"),
        ({"n_kv_heads": 3}, "model.n_kv_heads=3 does not divide model.n_heads=4; allowed: [1, 2, 4]"),
    ],
)
def test_bad_head_counts_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LM(ModelConfig(vocab_size=10, **overrides), MHAConfig())


def test_counts_and_flops_come_from_the_config_not_from_the_tensors():
    """ZeRO-3 leaves each rank's parameters as empty tensors (its partitions live elsewhere): the counts and the
    FLOPs a token, which MFU divides by, stay those of the whole model."""
    cfg = ModelConfig(vocab_size=1000)
    model = LM(cfg, MHAConfig())
    whole = model.parameter_counts()
    assert whole["total"] == sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.data = torch.empty(0)  # what deepspeed.zero partitioning does to a module's parameters
    assert model.parameter_counts() == whole
    matmul_weights = whole["non_embedding"] + 1000 * cfg.dim  # the LM head's V×C is a matmul; the embedding lookup is not
    assert model.flops_per_token(256) == 6 * matmul_weights + 12 * cfg.n_layers * cfg.dim * 256
    assert LM(ModelConfig(vocab_size=1000, tie_embeddings=True), MHAConfig()).flops_per_token(256) == model.flops_per_token(256)
