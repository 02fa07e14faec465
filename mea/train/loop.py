"""The training run: validate, put the components together, then the loop, which reads like the algorithm."""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model
from tqdm import tqdm

from mea import distributed
from mea.config import ConfigError, TrainConfig, batch_plan, validate
from mea.cpu_heap import keep_freed_memory
from mea.data import Batches, TokenWindows, prepare, validation_batches
from mea.models import LM, ModelConfig, variant_class
from mea.models.dynamics import DYNAMICS_SEQUENCES, measure
from mea.run_directory import RunDirectory, RunDirectoryError, check_amendments, identity_of, write_synced
from mea.runs import code_version

from . import checkpoint
from .engine import Engine, build_engine, compiles, describe, setup_distributed
from .errors import Diverged
from .metrics import MetricsLogger, peak_flops



def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill in what follows from the machine (precision, the global batch in sequences) and from an exported
    model to start from (its model and attention config replace the composed ones)."""
    trainer = cfg.trainer
    if trainer.init_from is not None:
        exported = Path(trainer.init_from) / "config.json"
        if not exported.is_file():
            raise ConfigError(f"trainer.init_from={trainer.init_from!r} has no config.json; give a folder written by mea-export or mea-compress")
        saved = json.loads(exported.read_text())
        cfg = replace(cfg, model=ModelConfig(**saved["model"]), attention=variant_class(saved["attention"]["name"]).Config(**saved["attention"]))
    gpu_without_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False)
    if trainer.precision == "auto":
        trainer = replace(trainer, precision="bf16" if device.type == "cuda" and not gpu_without_bf16 else "fp32")
    if trainer.precision == "bf16" and gpu_without_bf16:
        raise ConfigError(f"trainer.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 arithmetic (it needs compute capability 8.0 or later); "
                          "use trainer.precision=fp32 or auto")
    trainer = replace(trainer, compile=compiles(trainer.compile, device))  # recorded in config.yaml as decided
    trainer = replace(trainer, global_batch=batch_plan(cfg).global_batch)  # in sequences, where it was given in tokens
    return replace(cfg, trainer=trainer)


def build_model(cfg: TrainConfig, vocab_size: int, max_token_id: int) -> LM:
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = replace(model_cfg, vocab_size=vocab_size)
    elif max_token_id >= model_cfg.vocab_size:
        raise ConfigError(f"the corpus has token ids up to {max_token_id} but model.vocab_size={model_cfg.vocab_size}; set model.vocab_size=null to take the tokenizer's {vocab_size}")
    return LM(model_cfg, cfg.attention)


@torch.no_grad()
def evaluate(engine: Engine, windows: TokenWindows, n_windows: int, micro: int, rank: int, world_size: int) -> float:
    """Mean loss over the first n_windows of the validation split, shared out across ranks."""
    module = getattr(engine, "engine", engine.model)
    module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # Σ loss × windows, Σ windows; summed where the backend reads
    for x, y in validation_batches(windows, n_windows, micro, rank, world_size):
        with engine.autocast:
            total[0] += module(x.to(engine.device), y.to(engine.device)).double() * len(x)
        total[1] += len(x)
    distributed.summed_(total)
    module.train()
    return (total[0] / total[1]).item()


def dynamics(engine: Engine, windows: TokenWindows) -> dict[str, float]:
    """The training dynamics (mea.models.dynamics) on the first validation windows, the same on every rank."""
    x, _ = windows.stack(np.arange(min(DYNAMICS_SEQUENCES, len(windows))))
    with engine.full_parameters(), engine.autocast:
        return measure(engine.model, x.to(engine.device))


class StopFlag:
    """Set by SIGTERM (scancel, preemption), SIGUSR1 or SIGUSR2 (a scheduler's warning before the time limit:
    mea-launch's and submitit's) or Ctrl-C (a second one interrupts at once); all ranks agree on it before acting.
    The signal stays recorded for the process (`StopFlag.received`): a multirun ends after the run that saw it
    (train.py) instead of going on to the next.

    A handler some host process installed before the trainer's is called once the run has saved (`hand_on`).
    Under submitit that is its preemption handler, so the two cooperate: the trainer saves, then submitit
    requeues the job (`scontrol requeue`) and exits, and the requeued task resumes from the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    received: int | None = None
    earlier: dict[int, Callable] = {}

    def __init__(self):
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._set)
            # Python's own Ctrl-C handler would raise KeyboardInterrupt after the save; a multirun's earlier run left ours
            if callable(previous) and previous is not signal.default_int_handler and previous != StopFlag._set:
                StopFlag.earlier[sig] = previous

    @classmethod
    def _set(cls, signum, frame) -> None:
        if signum == signal.SIGINT and cls.received is not None:
            raise KeyboardInterrupt
        cls.received = signum

    @classmethod
    def hand_on(cls) -> None:
        """After the run saved: the signal's earlier handler, if it had one (submitit's requeue, which exits)."""
        if (handler := cls.earlier.get(cls.received)) is not None:
            handler(cls.received, None)

    def agreed(self) -> bool:
        return distributed.any_rank(StopFlag.received is not None)


@contextmanager
def sole_writer(run_dir: RunDirectory, rank: int):
    """Rank 0 holds the run directory's lease for the run's life; every rank stops if it cannot."""
    lease, refusal = run_dir.lease() if rank == 0 else None, None
    if lease is not None:
        try:
            lease.__enter__()
        except RunDirectoryError as e:
            refusal = str(e)
    if refusal := distributed.from_rank0(refusal):
        raise RunDirectoryError(refusal)
    try:
        yield
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)


def run(dict_cfg: DictConfig) -> dict:
    """Train one model as the config says, in a run directory that holds this run alone (mea.run_directory)."""
    validate(dict_cfg)
    device = pick_device(dict_cfg.trainer.device)
    if device.type == "cpu":
        keep_freed_memory()
    cfg = resolve(OmegaConf.to_object(dict_cfg), device)
    check_amendments(cfg)
    run_dir = RunDirectory(cfg.run_dir)
    amended = run_dir.check(identity_of(cfg), cfg.trainer.amend)  # before any compute; the corpus's key is checked once it is known
    micro = batch_plan(cfg, distributed.launched_world_size()).micro_batch  # before the process group starts
    rank, world_size = setup_distributed(cfg, device)
    done_before = finished_summary(run_dir.path, cfg.trainer.max_steps)
    if done_before is not None:
        if amended:
            raise RunDirectoryError(f"{run_dir.path} is finished; amending {', '.join(amended)} changes nothing it trained: raise trainer.max_steps too, or give a new hydra.run.dir")
        if rank == 0:
            print(f"{run_dir.path} is already done ({'diverged' if done_before.get('diverged') else f'{cfg.trainer.max_steps} steps'}); "
                  "raise trainer.max_steps to train on (with trainer.amend=[trainer.max_steps] where the schedule depends on it)")
        return done_before
    with sole_writer(run_dir, rank):
        try:
            return train(cfg, run_dir, device, micro, rank, world_size)
        except torch.OutOfMemoryError as e:  # the traceback follows; the checkpoints stay, and a config that fits resumes
            print(f"error: {out_of_memory_line(e, micro, device)}", file=sys.stderr, flush=True)
            raise


def out_of_memory_line(error: torch.OutOfMemoryError, micro: int, device: torch.device) -> str:
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    card = f"a card of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB" if device.type == "cuda" else f"the {device.type}"
    return (f"out of GPU memory at trainer.micro_batch={micro} per GPU, asking for {asked.group(1) if asked else 'more'} on {card}: lower trainer.micro_batch "
            "(gradient accumulation keeps the global batch) or set trainer.activation_checkpointing=true, and the same command resumes from the last checkpoint")


def train(cfg: TrainConfig, run_dir: RunDirectory, device: torch.device, micro: int, rank: int, world_size: int) -> dict:
    """The training run proper: data, model, engine, resume, the loop, the summary."""
    tc = cfg.trainer
    resume_point = checkpoint.find_resume_point(run_dir, tc.resume, tc.resume_from, rank)
    if resume_point is not None:
        saved = checkpoint.read_state(resume_point)
        checkpoint.check_compatible(resume_point, saved, asdict(cfg.model), asdict(cfg.attention), cfg.deepspeed.enabled)

    if rank == 0:  # one process tokenises; the others then find it in the cache
        corpus = prepare(cfg.data)
    distributed.barrier()
    if rank != 0:
        corpus = prepare(cfg.data, log=lambda _: None)
    torch.manual_seed(tc.seed)
    model = build_model(cfg, corpus.vocab_size, corpus.manifest["max_token_id"]).to(device)
    cfg = replace(cfg, model=model.cfg, arm=cfg.label)  # W&B groups runs by config.arm
    identity = identity_of(cfg, corpus.path.name)
    amended = run_dir.check(identity, tc.amend)
    if tc.init_from is not None and resume_point is None:
        load_model(model, str(Path(tc.init_from) / "model.safetensors"))
    engine = build_engine(model, cfg, device, micro, world_size)
    train_batches = Batches(TokenWindows(corpus.shards("train"), cfg.data.seq_len), tc.global_batch, seed=tc.seed, rank=rank, world_size=world_size)
    val_windows = TokenWindows(corpus.shards("val"), cfg.data.seq_len)

    state = {"step": 0, "bad_steps_total": 0, "window_losses": [], "val_loss": float("nan"), "wandb_id": None, "wall_time_s": 0.0}
    if resume_point is not None:
        state.update(checkpoint.load(engine, resume_point))
    start_step = state["step"]
    params, flops_per_token = model.parameter_counts(), model.flops_per_token(cfg.data.seq_len)  # from the config: ZeRO-3's partitions hold nothing to count
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    run_name = f"{cfg.label}-{cfg.model.name}-lr{cfg.optim.lr:g}-s{tc.seed}"
    tags = (f"variant:{cfg.label}", f"size:{cfg.model.name}", f"lr:{cfg.optim.lr:g}", f"seed:{tc.seed}")  # W&B filters by these
    metrics = MetricsLogger(run_dir.path, cfg.logger, run_name, resolved, enabled=rank == 0, resume_step=state["step"], wandb_id=state["wandb_id"], tags=tags)
    if rank == 0:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.record(identity, amended, start_step)
        (run_dir.path / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        save_hydra_record(run_dir.path / ".hydra")
        print(f"{cfg.label} · {cfg.model.name}: {params['total']:,} parameters ({params['non_embedding']:,} non-embedding), {flops_per_token:,.0f} FLOPs a token · "
              f"{describe(engine)} · {world_size} process(es) on {device}")
        if resume_point is not None:
            print(f"resuming from {resume_point} at step {state['step']}")

    tokens_per_step = tc.global_batch * cfg.data.seq_len
    peak = peak_flops(device, tc.peak_tflops)
    stop = StopFlag()
    if device.type == "cuda":  # this run's peak, not that of a run before it in the same process (a multirun)
        torch.cuda.reset_peak_memory_stats(device)
    bad_in_a_row, last_row = 0, {}
    last_log_time = start_time = time.perf_counter()
    wall_before = state["wall_time_s"]

    def save_checkpoint(step: int) -> Path:
        state.update(step=step, wandb_id=metrics.wandb_id, wall_time_s=wall_before + time.perf_counter() - start_time)
        return checkpoint.save(engine, run_dir, {**state, "model": asdict(cfg.model), "attention": asdict(cfg.attention), "deepspeed": cfg.deepspeed.enabled}, tc.keep_checkpoints)

    progress = tqdm(range(start_step, tc.max_steps), initial=start_step, total=tc.max_steps, desc=run_name, disable=rank != 0, dynamic_ncols=True)
    for step in progress:
        lr = engine.lr
        loss, grad_norm = engine.train_step(*train_batches(step))
        done = step + 1
        if math.isfinite(loss):
            bad_in_a_row = 0
            state["window_losses"].append(loss)
        else:
            bad_in_a_row += 1
            state["bad_steps_total"] += 1
            if bad_in_a_row >= tc.max_bad_steps:
                kept = run_dir.checkpoints()
                if rank == 0:  # a diverged run is a result too (an LR sweep records it), not a crash to retry
                    write_json(run_dir.path / "summary.json", {"variant": cfg.label, "model": cfg.model.name, "diverged": True, "steps": done, "tokens": done * tokens_per_step,
                                                          "params": params["total"], "non_embedding_params": params["non_embedding"], "final_train_loss": float("nan"),
                                                          "final_val_loss": float("nan"), "bad_steps": state["bad_steps_total"], "wall_time_s": wall_before + time.perf_counter() - start_time, "run_dir": str(run_dir.path),
                                                          "code": code_version()})
                raise Diverged(
                    f"the loss was not finite for {bad_in_a_row} steps in a row (up to step {done}); stopped, last good checkpoint: "
                    f"{kept[-1] if kept else 'none'}; lower optim.lr or raise trainer.max_bad_steps"
                )

        evaluating = done % tc.eval_every == 0 or done == tc.max_steps
        if done % tc.log_every == 0 or evaluating:  # an eval step writes a row even off the log grid
            now = time.perf_counter()
            steps_in_window = max(1, len(state["window_losses"]))
            row = {
                "step": done,
                "tokens": done * tokens_per_step,
                "loss": sum(state["window_losses"]) / steps_in_window if state["window_losses"] else float("nan"),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": (done - last_row.get("step", start_step)) * tokens_per_step / (now - last_log_time),
                "bad_steps": state["bad_steps_total"],
            }
            if peak:
                row["mfu"] = row["tokens_per_s"] * flops_per_token / world_size / peak
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if evaluating:
                state["val_loss"] = row["val_loss"] = evaluate(engine, val_windows, tc.eval_batches * tc.global_batch, micro, rank, world_size)
                if tc.dynamics:
                    row |= dynamics(engine, val_windows)
            metrics.log(row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            state["window_losses"], last_log_time, last_row = [], time.perf_counter(), row

        preempted = stop.agreed()
        if done == tc.max_steps or preempted or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
            saved_at = save_checkpoint(done)
        if preempted:
            if rank == 0:
                print(f"stop signal: saved {saved_at}; the same command resumes from it")
            metrics.close({})
            return {"preempted": True, "step": done, "checkpoint": str(saved_at)}

    final = run_dir.checkpoints()[-1]
    summary = {}
    if rank == 0:
        tokenizer = corpus.tokenizer
        publish_copy(final / "model.safetensors", run_dir.path / "model.safetensors")
        wall = wall_before + time.perf_counter() - start_time
        summary = {
            "variant": cfg.label,
            "model": cfg.model.name,
            "params": params["total"],
            "non_embedding_params": params["non_embedding"],
            "flops_per_token": flops_per_token,
            "steps": tc.max_steps,
            "tokens": tc.max_steps * tokens_per_step,
            "passes": tc.max_steps * tc.global_batch / len(train_batches.windows),  # over the training split: above ~4, data repeats too often
            "final_train_loss": last_row.get("loss", float("nan")),
            "final_val_loss": state["val_loss"],
            "bad_steps": state["bad_steps_total"],
            "wall_time_s": wall,
            "tokens_per_s": (tc.max_steps - start_step) * tokens_per_step / (time.perf_counter() - start_time),
            "world_size": world_size,
            "run_dir": str(run_dir.path),
            "data": corpus.path.name,
            "data_content": corpus.content,
            "code": code_version(),
            "sample": generate_sample(run_dir.path / "model.safetensors", cfg, tokenizer, tc.sample_prompt, tc.sample_tokens),
        }
        write_json(run_dir.path / "summary.json", summary)
        print(f"final train loss {summary['final_train_loss']:.4f} · val loss {summary['final_val_loss']:.4f} · perplexity {math.exp(summary['final_val_loss']):.1f}")
        print(f"run directory: {run_dir.path}")
        print(f"sample: {summary['sample']!r}")
    metrics.close(summary)
    distributed.barrier()
    return summary


def finished_summary(run_dir: Path, max_steps: int) -> dict | None:
    """The summary of a run that already reached max_steps or diverged, so that running it again does nothing."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("diverged") or summary.get("steps") == max_steps else None


def save_hydra_record(folder: Path) -> None:
    """Hydra's own record of the start (its overrides and settings), written only once the run directory has
    accepted it, so a refused start leaves the record of the run it refused untouched."""
    if HydraConfig.initialized():
        folder.mkdir(exist_ok=True)
        OmegaConf.save(HydraConfig.get().overrides.task, folder / "overrides.yaml")
        OmegaConf.save({"hydra": HydraConfig.get()}, folder / "hydra.yaml")


def write_json(path: Path, data: dict) -> None:
    write_synced(path, json.dumps(data, indent=1))


def publish_copy(source: Path, target: Path) -> None:
    """Copy a file into place whole or not at all."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def generate_sample(weights: Path, cfg: TrainConfig, tokenizer, prompt: str, n_tokens: int) -> str:
    """A short generation from the saved weights, on one CPU process whatever the training engine was."""
    model = LM(cfg.model, cfg.attention).eval()
    load_model(model, str(weights))
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    out = model.generate(ids, n_tokens, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    return tokenizer.decode(out[0].tolist())
