"""Attention variants, each registered under its config name. Importing this package registers them all."""
from . import diff, mea, mha, mha_gn, tha  # noqa: F401  (registration)
from .base import REGISTRY, AttentionConfig, HeadShape, KVCache, Rotary, build_attention, variant_class

__all__ = ["REGISTRY", "AttentionConfig", "HeadShape", "KVCache", "Rotary", "build_attention", "variant_class"]
