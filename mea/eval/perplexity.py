"""`mea-eval`: validation loss and perplexity of an exported model on any data config.

    mea-eval exported/ data=tinyshakespeare data.source=../shared/data/tinyshakespeare/input.txt

The data is tokenised with the model's own tokenizer (data.tokenizer is set to it), so ids always match.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mea.config import ConfigError, compose_config
from mea.data import DataError, TokenWindows, prepare, validation_batches
from mea.pretrained import load_pretrained
from mea.runs import RunError

EVAL_WINDOWS = 256  # the first windows of the validation split: the same set for every model


@torch.no_grad()
def evaluate(model_dir: Path, overrides: list[str], max_windows: int = EVAL_WINDOWS, batch_size: int = 8) -> dict:
    model, _ = load_pretrained(model_dir)
    cfg = compose_config([*overrides, f"data.tokenizer={model_dir.resolve() / 'tokenizer.json'}"])
    data = OmegaConf.to_object(cfg.data)
    corpus = prepare(data, log=lambda _: None)
    windows = TokenWindows(corpus.shards("val"), min(data.seq_len, model.cfg.max_seq_len))
    total, count = 0.0, 0
    for x, y in validation_batches(windows, max_windows, min(batch_size, len(windows))):
        total += model(x, y).item() * len(x)
        count += len(x)
    loss = total / count
    return {"model": str(model_dir), "data": corpus.path.name, "windows": count, "seq_len": windows.seq_len, "val_loss": loss, "perplexity": math.exp(loss)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        print(json.dumps(evaluate(Path(argv[0]), argv[1:])))
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
