"""The export folder, written and read: `model.safetensors`, `config.json` (the model and attention configs) and
the `tokenizer.json` the model was trained with. Loading runs no code from the folder: safetensors and JSON only.
mea-export (mea.tools.export) writes one from a run; evaluation, compression and the studies load them."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model, save_model

from mea.models import LM, ModelConfig, variant_class
from mea.runs import RunError


def write_model_folder(model: LM, tokenizer: Path | None, out: Path, extra: dict[str, dict] | None = None) -> Path:
    """An export folder: weights, config.json, the tokenizer and any extra JSON files, renamed into place when complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"format": 1, "model": asdict(model.cfg), "attention": asdict(model.attention_cfg)}, indent=1))
    if tokenizer is not None and tokenizer.is_file():
        shutil.copy(tokenizer, tmp / "tokenizer.json")
    for name, data in (extra or {}).items():
        (tmp / name).write_text(json.dumps(data, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_from(model_cfg: dict, attention_cfg: dict) -> LM:
    attention = variant_class(attention_cfg["name"]).Config(**attention_cfg)
    return LM(ModelConfig(**model_cfg), attention)


def load_pretrained(path: Path, device: str = "cpu"):
    """(model in eval mode, tokenizer or None) from an export folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RunError(f"{path} has no config.json; give a folder written by mea-export")
    config = json.loads((path / "config.json").read_text())
    model = model_from(config["model"], config["attention"])
    load_model(model, str(path / "model.safetensors"), device=device)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model.to(device).eval(), tokenizer
