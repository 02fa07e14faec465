"""`mea-kv-report`: KV-cache bytes per token, and the longest context or largest batch that fits in memory,
for each attention variant and stored-head setting of a model size.

    mea-kv-report --model 1.3b --memory-gib 80 --batch 8 --context 4096 --dtype bf16
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from mea.models import REGISTRY, ModelConfig, parameter_counts

ROOT = Path(__file__).resolve().parents[2]
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def preset(name: str) -> ModelConfig:
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: --model {name} is not a preset in conf/model; choose one of: {', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int) -> int:
    """Every layer caches a key and a value of width D for each stored head (the same for every variant)."""
    head_dim = cfg.dim // cfg.n_heads
    return sum(2 * cfg.kv_heads(layer) * head_dim * bytes_per_value for layer in range(cfg.n_layers))


def settings(cfg: ModelConfig) -> list[tuple[str, ModelConfig]]:
    H = cfg.n_heads
    rows = [(f"{name} (G = H = {H})", replace(cfg, n_kv_heads=H)) for name in sorted(REGISTRY)]
    rows += [(f"mha GQA (G = {H // 2})", replace(cfg, n_kv_heads=H // 2)), (f"mea virtual heads (G = {H // 2})", replace(cfg, n_kv_heads=H // 2)),
             (f"mea virtual heads (G = {H // 4})", replace(cfg, n_kv_heads=H // 4)),
             (f"mea, middle half of the layers at G = {H // 2}", replace(cfg, kv_heads_per_layer=[
                 H // 2 if cfg.n_layers // 4 <= i < cfg.n_layers - cfg.n_layers // 4 else H for i in range(cfg.n_layers)]))]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-kv-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1.3b")
    parser.add_argument("--memory-gib", type=float, default=80.0, help="accelerator memory for weights and cache")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--dtype", choices=list(BYTES), default="bf16")
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args(argv)
    cfg = replace(preset(args.model), vocab_size=args.vocab)
    width = BYTES[args.dtype]
    weights = parameter_counts(cfg, REGISTRY["mha"].Config())["total"] * width
    free = args.memory_gib * 2**30 - weights
    print(f"{args.model}: {cfg.n_layers} layers, {cfg.n_heads} heads of {cfg.dim // cfg.n_heads}; weights {weights / 2**30:.2f} GiB in {args.dtype}; {args.memory_gib:g} GiB")
    print(f"| setting | KV bytes/token | vs mha | longest context at batch {args.batch} | largest batch at context {args.context} |")
    print("|---|---|---|---|---|")
    full = kv_bytes_per_token(cfg, width)
    for label, setting in settings(cfg):
        per_token = kv_bytes_per_token(setting, width)
        print(f"| {label} | {per_token:,} | {per_token / full:.2f} | {max(0, int(free // (per_token * args.batch))):,} | {max(0, int(free // (per_token * args.context))):,} |")


if __name__ == "__main__":
    main()
