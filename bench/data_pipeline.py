"""Data-path speed, measured side by side in one run:

1. prepare (datasets -> tokenizers -> shards + checksums) against the raw `tokenizers` batch encode of the
   same documents already in memory; the target is at least 80% of the raw throughput;
2. loader batches per second against the tiny model's training steps per second (the loader must be faster).

    python bench/data_pipeline.py [--corpus stdlib|PATH] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402
from mea.config import DataConfig  # noqa: E402
from mea.data import Batches, TokenWindows, prepare  # noqa: E402
from mea.data.shards import ENCODE_BATCH, batched  # noqa: E402
from mea.data.sources import load_documents  # noqa: E402
from mea.models import LM, ModelConfig  # noqa: E402
from mea.models.attention.mha import MHAConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="stdlib", help="stdlib, or a text file / folder / glob")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mea-bench-"))
    kind = "stdlib" if args.corpus == "stdlib" else "files"
    base = DataConfig(name="bench", kind=kind, source=args.corpus, cache_dir=str(work / "train-tokenizer"))
    trained = prepare(base, log=lambda _: None)  # a tokenizer to share, so that BPE training is not timed
    cfg = replace(base, tokenizer=str(trained.path / "tokenizer.json"))
    tok = trained.tokenizer
    texts = list(load_documents(cfg, str(work / "hf")).texts())

    raw, full = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        n_raw = sum(len(e.ids) + 1 for batch in batched(texts, ENCODE_BATCH) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
        raw.append(n_raw / (time.perf_counter() - start))
        start = time.perf_counter()
        corpus = prepare(replace(cfg, cache_dir=str(work / f"round{r}")), log=lambda _: None)
        n = corpus.manifest["tokens"]["train"] + corpus.manifest["tokens"]["val"]
        full.append(n / (time.perf_counter() - start))
    assert n == n_raw

    windows = TokenWindows(corpus.shards("train"), 256)
    batches = Batches(windows, 16, seed=0)
    start = time.perf_counter()
    for step in range(200):
        batches(step)
    loader_rate = 200 / (time.perf_counter() - start)
    model = LM(ModelConfig(vocab_size=corpus.vocab_size), MHAConfig())
    opt = torch.optim.AdamW(model.parameters())
    x, y = batches(0)
    model(x, y).backward()
    start = time.perf_counter()
    for _ in range(5):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    step_rate = 5 / (time.perf_counter() - start)

    print(f"device: {describe(torch.device('cpu'))} · corpus {args.corpus}: {len(texts):,} documents, {n:,} tokens · median of {args.rounds} rounds")
    print(f"raw tokenizers encode_batch_fast: {statistics.median(raw):12,.0f} tokens/s")
    print(f"prepare (datasets+shards+sha256): {statistics.median(full):12,.0f} tokens/s  ratio {statistics.median(full) / statistics.median(raw):.2f} (target >= 0.80)")
    print(f"loader: {loader_rate:,.0f} batches/s of 16 x 256 · tiny model: {step_rate:.1f} steps/s · loader/model {loader_rate / step_rate:,.0f}x")


if __name__ == "__main__":
    main()
