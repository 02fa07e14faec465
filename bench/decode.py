"""One decode step of one attention layer over a long KV cache, measured side by side in one run:

- full: `mha`, H heads cached;
- expanded: H/2 stored heads rebuilt into H virtual heads through HLC at every step, then attention (the naive way);
- absorbed: `mea` with G = H/2 as implemented — C_K folded into the queries, C_V applied after the attention,
  the G stored heads read as one shared head of width G·D.

    python bench/decode.py                  # CPU: batch 8, 8 heads of 64, 8192 cached tokens, fp32
    python bench/decode.py --device cuda    # GPU: batch 64, 32 heads of 128, 4096 cached tokens, bf16

A decode step is bound by the bytes it reads: each arm's "cache GB/s" (its cache's bytes over its step time) is
set against the copy bandwidth measured in the same run. Imports torch and mea.models only, so it runs on a bare
GPU machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe, memory_bandwidth, sync  # noqa: E402
from mea.models.attention.base import HeadShape, KVCache, Rotary, causal_attention  # noqa: E402
from mea.models.attention.mea import ExplicitAttention, MEAConfig, compose, side_by_side  # noqa: E402
from mea.models.attention.mha import MHAConfig, MultiHeadAttention  # noqa: E402

PRESETS = {
    "cpu": dict(batch=8, heads=8, head_dim=64, cached=8192, reps=20),
    "cuda": dict(batch=64, heads=32, head_dim=128, cached=4096, reps=200),
    "smoke": dict(batch=2, heads=4, head_dim=32, cached=2048, reps=3),  # does it run
}


def expanded_step(layer: ExplicitAttention, x, rope, cache: KVCache):
    """The naive decode: rebuild all H virtual heads from the stored ones at every step."""
    q, k0, v0 = layer.split_qkv(layer.wqkv(x))
    k, v = cache.update(side_by_side(rope(k0)), side_by_side(v0))
    B, _, S, X = k.shape
    G = layer.hlc_k.shape[0]
    as_heads = lambda t: t.view(B, S, G, X // G).transpose(1, 2)  # noqa: E731
    o = causal_attention(rope(q), compose(as_heads(k), layer.hlc_k), compose(as_heads(v), layer.hlc_v))
    return layer.output(o)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", choices=list(PRESETS), help="batch, heads and cache length (default: the device's; smoke: a seconds-long check that it runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    p = PRESETS[args.preset or args.device]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D, B, S = p["heads"], p["head_dim"], p["batch"], p["cached"]
    torch.manual_seed(0)
    full = MultiHeadAttention(MHAConfig(), HeadShape(H * D, H, H), 0).to(device, dtype).eval()
    half = ExplicitAttention(MEAConfig(norm=False), HeadShape(H * D, H, H // 2), 0).to(device, dtype).eval()
    x = torch.randn(B, 1, H * D, device=device, dtype=dtype)
    rope = Rotary(torch.tensor([S], device=device), 10000.0)

    def cache_for(heads: int, layout) -> KVCache:
        cache = KVCache(S + 1)
        cache.update(*(layout(torch.randn(B, heads, S, D, device=device, dtype=dtype)) for _ in range(2)))
        return cache

    keep = lambda t: t  # noqa: E731
    arms = {"full cache (H heads)": (lambda c: full(x, rope, c), H, keep), "half cache, expanded": (lambda c: expanded_step(half, x, rope, c), H // 2, side_by_side),
            "half cache, absorbed": (lambda c: half(x, rope, c), H // 2, side_by_side)}
    caches = {name: cache_for(heads, layout) for name, (_, heads, layout) in arms.items()}
    times: dict[str, list[float]] = {name: [] for name in arms}
    with torch.no_grad():
        for _ in range(p["reps"]):
            for name, (step, _, _) in arms.items():
                caches[name].length = S  # the same cached length every repetition
                sync(device)
                start = time.perf_counter()
                step(caches[name])
                sync(device)
                times[name].append(time.perf_counter() - start)
    print(f"device: {describe(device)} · {dtype} · batch {B}, {H} heads of {D}, {S} cached tokens · median of {p['reps']} steps")
    print(f"measured copy bandwidth: {memory_bandwidth(device) / 1e9:.1f} GB/s")
    base = statistics.median(times["full cache (H heads)"][2:])
    print(f"{'arm':<24} {'ms/step':>8} {'vs full':>8} {'cache MiB':>10} {'cache GB/s':>11}")
    for name, ts in times.items():
        t = statistics.median(ts[2:])
        cache_bytes = caches[name].nbytes
        print(f"{name:<24} {t * 1e3:8.3f} {t / base:8.2f} {cache_bytes / 2**20:10.1f} {cache_bytes / t / 1e9:11.1f}")


if __name__ == "__main__":
    main()
