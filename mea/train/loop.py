"""The training run: validate, build the components, then the loop, which reads like the algorithm."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_model
from tqdm import tqdm

from mea.config import ConfigError, TrainConfig, validate
from mea.data import Batches, TokenWindows, prepare, validation_batches
from mea.models import LM

from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def build_model(cfg: TrainConfig, vocab_size: int, max_token_id: int) -> LM:
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = replace(model_cfg, vocab_size=vocab_size)
    elif max_token_id >= model_cfg.vocab_size:
        raise ConfigError(f"the corpus has token ids up to {max_token_id} but model.vocab_size={model_cfg.vocab_size}; set model.vocab_size=null to take the tokenizer's {vocab_size}")
    return LM(model_cfg, cfg.attention)


@torch.no_grad()
def evaluate(model: LM, windows: TokenWindows, batch_size: int, n_batches: int, device: torch.device, autocast) -> float:
    model.eval()
    losses = []
    for x, y in validation_batches(windows, batch_size, n_batches):
        with autocast:
            losses.append(model.loss(x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def run(dict_cfg: DictConfig) -> dict:
    """Train one model as the config says; write metrics.jsonl, config.yaml and summary.json into run_dir."""
    validate(dict_cfg)
    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    tc = cfg.trainer
    world_size, rank = 1, 0
    micro = tc.micro_batch or tc.global_batch // world_size
    if tc.global_batch % (micro * world_size):
        raise ConfigError(f"trainer.global_batch={tc.global_batch} is not a multiple of trainer.micro_batch={micro} × world size {world_size}; change one of them")
    accumulation = tc.global_batch // (micro * world_size)
    device = pick_device(tc.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    corpus = prepare(cfg.data)
    torch.manual_seed(tc.seed)
    model = build_model(cfg, corpus.vocab_size, corpus.manifest["max_token_id"]).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.scheduler, tc.max_steps)
    train_batches = Batches(TokenWindows(corpus.shards("train"), cfg.data.seq_len), tc.global_batch, seed=tc.seed, rank=rank, world_size=world_size)
    val_windows = TokenWindows(corpus.shards("val"), cfg.data.seq_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    resolved = OmegaConf.to_container(OmegaConf.structured(replace(cfg, model=model.cfg)))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    params = model.parameter_counts()
    print(f"{cfg.attention.name} · {cfg.model.name}: {params['total']:,} parameters ({params['non_embedding']:,} non-embedding) on {device}")
    run_name = f"{cfg.attention.name}-{cfg.model.name}-lr{cfg.optim.lr:g}-s{tc.seed}"
    metrics = MetricsLogger(run_dir, cfg.logger, run_name, resolved)

    tokens_per_step = tc.global_batch * cfg.data.seq_len
    window_losses: list[float] = []
    last_log_time, last_row, val_loss = time.perf_counter(), {}, float("nan")
    start_time = last_log_time
    progress = tqdm(range(tc.max_steps), desc=run_name, disable=rank != 0, dynamic_ncols=True)
    for step in progress:
        x, y = train_batches(step)
        loss_sum = 0.0
        for xm, ym in zip(x.split(micro), y.split(micro)):
            with autocast:
                loss = model.loss(xm.to(device), ym.to(device)) / accumulation
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_losses.append(loss_sum)

        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            now = time.perf_counter()
            row = {
                "step": done,
                "tokens": done * tokens_per_step,
                "loss": sum(window_losses) / len(window_losses),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": len(window_losses) * tokens_per_step / (now - last_log_time),
            }
            if done % tc.eval_every == 0 or done == tc.max_steps:
                val_loss = row["val_loss"] = evaluate(model, val_windows, micro, tc.eval_batches, device, autocast)
            metrics.log(row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            window_losses, last_log_time, last_row = [], time.perf_counter(), row

    wall = time.perf_counter() - start_time
    save_model(model, str(run_dir / "model.safetensors"))
    sample = generate_sample(model, corpus.tokenizer, tc.sample_prompt, tc.sample_tokens, device)
    summary = {
        "variant": cfg.attention.name,
        "model": cfg.model.name,
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "steps": tc.max_steps,
        "tokens": tc.max_steps * tokens_per_step,
        "final_train_loss": last_row.get("loss", float("nan")),
        "final_val_loss": val_loss,
        "wall_time_s": wall,
        "tokens_per_s": tc.max_steps * tokens_per_step / wall,
        "run_dir": str(run_dir),
        "data": corpus.path.name,
        "sample": sample,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    metrics.close(summary)
    print(f"final train loss {summary['final_train_loss']:.4f} · val loss {summary['final_val_loss']:.4f} · perplexity {math.exp(val_loss):.1f}")
    print(f"run directory: {run_dir}")
    print(f"sample: {sample!r}")
    return summary


def generate_sample(model: LM, tokenizer, prompt: str, n_tokens: int, device: torch.device) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids], device=device)
    out = model.generate(ids, n_tokens, temperature=0.8, top_k=40, generator=torch.Generator(device).manual_seed(0))
    return tokenizer.decode(out[0].tolist())
