"""mea: pretraining experiments that compare attention variants, above all Multi-head Explicit Attention."""
__version__ = "0.1.0"
