"""Export a run or checkpoint to a self-contained folder, load it back, and generate from it.

    mea-export runs/demo exported/            # or a checkpoint folder runs/demo/checkpoints/step-0000300
    mea-generate exported/ --prompt "def " --tokens 64

An export is `model.safetensors`, `config.json` (the model and attention configs) and the `tokenizer.json` the
model was trained with. Loading runs no code from the folder: safetensors and JSON only.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model

from mea.pretrained import load_pretrained, model_from, write_model_folder
from mea.runs import RunError, read_run


def source_files(source: Path) -> tuple[Path, dict, dict, Path | None]:
    """(weights, model config, attention config, tokenizer) of a run directory or a checkpoint folder."""
    if (source / "trainer_state.json").is_file():  # a checkpoint: its run directory is two levels up
        state = json.loads((source / "trainer_state.json").read_text())
        run = read_run(source.parents[1])
        return source / "model.safetensors", state["model"], state["attention"], tokenizer_of(run)
    run = read_run(source)
    return source / "model.safetensors", asdict(run.config.model), asdict(run.config.attention), tokenizer_of(run)


def tokenizer_of(run) -> Path | None:
    from mea.data.shards import prepared_path

    path = prepared_path(run.config.data, run.data_key) / "tokenizer.json"
    return path if path.is_file() else None


def export(source: Path, out: Path) -> Path:
    weights, model_cfg, attention_cfg, tokenizer = source_files(Path(source))
    if not weights.is_file():
        raise RunError(f"{source} has no model.safetensors; export a finished run or a checkpoint folder")
    model = model_from(model_cfg, attention_cfg)
    try:
        load_model(model, str(weights))  # strict: the weights must fit the config
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise RunError(f"the weights in {weights} do not fit its model config ({detail}); export the run the weights came from") from None
    return write_model_folder(model, tokenizer, out)


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory or a checkpoint folder")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(f"exported to {export(args.source, args.out)}")
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def generate_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-generate", description="Sample text from an exported model (KV-cached decoding).")
    parser.add_argument("model", type=Path, help="a folder written by mea-export")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_pretrained(args.model, args.device)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer.json; export it from its run directory", file=sys.stderr)
        sys.exit(2)
    ids = torch.tensor([tokenizer.encode(args.prompt, add_special_tokens=False).ids], device=args.device)
    out = model.generate(ids, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=torch.Generator(args.device).manual_seed(args.seed))
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    export_main()
