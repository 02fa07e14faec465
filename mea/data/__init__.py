"""Data: sources through `datasets`, tokenizers through `tokenizers`, memory-mapped shards, a deterministic loader."""
from .loader import Batches, TokenWindows, validation_batches
from .shards import PreparedCorpus, prepare
from .sources import DataError

__all__ = ["Batches", "DataError", "PreparedCorpus", "TokenWindows", "prepare", "validation_batches"]
