"""Models; imports torch alone, so benchmarks run on a bare GPU machine."""
from .attention import REGISTRY, AttentionConfig, KVCache, build_attention, variant_class
from .transformer import LM, ModelConfig, check_shape

__all__ = ["LM", "REGISTRY", "AttentionConfig", "KVCache", "ModelConfig", "build_attention", "check_shape", "variant_class"]
