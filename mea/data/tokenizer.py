"""Tokenizers through `tokenizers`: a byte-level BPE trained on the corpus, or one loaded from disk."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .sources import DataError

EOD = "<|endoftext|>"
EOD_CANDIDATES = (EOD, "<|end_of_text|>", "</s>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is a token, so any text round-trips; EOD separates documents."""
    if vocab_size < 257:
        raise DataError(f"data.vocab_size={vocab_size} cannot hold the 256 byte tokens and the end-of-document token; use at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a local Hugging Face tokenizer folder holding one."""
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"data.tokenizer={path!r}: no tokenizer.json there; give a tokenizer.json file, a folder with one, or 'bpe' to train one")
    tok = Tokenizer.from_file(str(file))
    if eod_id(tok) is None:
        tok.add_special_tokens([EOD])
    return tok


def eod_id(tok: Tokenizer) -> int | None:
    for token in EOD_CANDIDATES:
        idx = tok.token_to_id(token)
        if idx is not None:
            return idx
    return None
