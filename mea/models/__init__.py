"""Models; imports torch alone, so benchmarks run on a bare GPU machine."""
from .attention import REGISTRY, AttentionConfig, KVCache, build_attention, variant_class
from .transformer import LM, ModelConfig, check_layers, flops_per_token, parameter_counts

__all__ = ["LM", "REGISTRY", "AttentionConfig", "KVCache", "ModelConfig", "build_attention", "check_layers", "flops_per_token", "parameter_counts", "variant_class"]
