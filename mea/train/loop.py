"""The training run: validate, put the components together, then the loop, which reads like the algorithm."""
from __future__ import annotations

import json
import math
import re
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
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
from mea.data import Batches, PreparedCorpus, TokenWindows, prepare, validation_batches
from mea.models import LM, ModelConfig, variant_class
from mea.models import loss as loss_forms
from mea.models.dynamics import DYNAMICS_SEQUENCES, measure
from mea.run_directory import RunDirectory, RunDirectoryError, check_amendments, copy_synced, identity_of

from . import checkpoint
from .checkpoint import Checkpointer, TrainState
from .engine import Engine, build_engine, compiles, describe, setup_distributed
from .errors import Diverged
from .metrics import MetricsLogger, StepMetrics
from .summary import RunSummary, finished_summary



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
    trainer = replace(trainer, cross_entropy=loss_forms.DEFAULT if trainer.cross_entropy == "auto" else trainer.cross_entropy)
    if problem := loss_forms.why_unavailable(trainer.cross_entropy, device):
        raise ConfigError(problem)
    trainer = replace(trainer, global_batch=batch_plan(cfg).global_batch)  # in sequences, where it was given in tokens
    return replace(cfg, trainer=trainer)


def build_model(cfg: TrainConfig, vocab_size: int, max_token_id: int) -> LM:
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = replace(model_cfg, vocab_size=vocab_size)
    elif max_token_id >= model_cfg.vocab_size:
        raise ConfigError(f"the corpus has token ids up to {max_token_id} but model.vocab_size={model_cfg.vocab_size}; set model.vocab_size=null to take the tokenizer's {vocab_size}")
    return LM(model_cfg, cfg.attention, cfg.trainer.cross_entropy)


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

    A handler some host process installed before the trainer's is called once the run has saved (`call_earlier_handler`).
    Under submitit that is its preemption handler, so the two cooperate: the trainer saves, then submitit
    requeues the job (`scontrol requeue`) and exits, and the requeued task resumes from the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    received: int | None = None
    earlier_handlers: dict[int, Callable] = {}

    def __init__(self):
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._set)
            # Python's own Ctrl-C handler would raise KeyboardInterrupt after the save; a multirun's earlier run left ours
            if callable(previous) and previous is not signal.default_int_handler and previous != StopFlag._set:
                StopFlag.earlier_handlers[sig] = previous

    @classmethod
    def _set(cls, signum, frame) -> None:
        if signum == signal.SIGINT and cls.received is not None:
            raise KeyboardInterrupt
        cls.received = signum

    @classmethod
    def call_earlier_handler(cls) -> None:
        """After the run saved: the signal's earlier handler, if it had one (submitit's requeue, which exits)."""
        if (handler := cls.earlier_handlers.get(cls.received)) is not None:
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


def run(composed: DictConfig) -> dict:
    """Train one model as the config says, in a run directory that holds this run alone (mea.run_directory)."""
    validate(composed)
    device = pick_device(composed.trainer.device)
    if device.type == "cpu":
        keep_freed_memory()
    cfg = resolve(OmegaConf.to_object(composed), device)
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
    """The algorithm: build, resume, then each step train, log, evaluate when due, checkpoint when due, stop when
    asked; then the summary."""
    trainer = cfg.trainer
    resume_point = checkpoint.compatible_resume_point(run_dir, cfg, rank)  # before any compute
    corpus = prepare_once(cfg, rank)
    cfg, engine = build(cfg, corpus, device, micro, world_size, resume_point)
    with engine:  # released when the run ends, however it ends: the next run of a multirun has its memory
        checkpointer = Checkpointer(engine, run_dir, cfg)
        state = checkpointer.load(resume_point)
        train_batches = Batches(TokenWindows(corpus.shards("train"), cfg.data.seq_len), trainer.global_batch, seed=trainer.seed, rank=rank, world_size=world_size)
        val_windows = TokenWindows(corpus.shards("val"), cfg.data.seq_len)
        counts, flops_per_token = engine.model.parameter_counts(), engine.model.flops_per_token(cfg.data.seq_len)  # from the config: ZeRO-3's partitions hold nothing to count
        summaries = RunSummary(cfg, run_dir, corpus, counts, flops_per_token, world_size, len(train_batches.windows), device)
        metrics = start_record(cfg, run_dir, corpus, state, rank, resume_point, f"{counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding), "
                               f"{flops_per_token:,.0f} FLOPs a token · {describe(engine)} · {world_size} process(es) on {device}")
        step_metrics = StepMetrics(trainer.global_batch * cfg.data.seq_len, flops_per_token, world_size, device, trainer.peak_tflops, state.step)
        stop = StopFlag()
        for step in tqdm(range(state.step, trainer.max_steps), initial=state.step, total=trainer.max_steps, desc=run_name(cfg), disable=rank != 0, dynamic_ncols=True):
            lr = engine.lr
            loss, grad_norm = engine.train_step(*train_batches(step))
            state.record(loss)
            if state.bad_in_a_row >= trainer.max_bad_steps:
                raise diverged(summaries, state, checkpointer, metrics, rank)
            evaluating = state.step % trainer.eval_every == 0 or state.step == trainer.max_steps
            if state.step % trainer.log_every == 0 or evaluating:  # an eval step writes a row even off the log grid
                row, state.window_losses = step_metrics.row(state.step, state.window_losses, lr, grad_norm, state.bad_steps_total), []
                if evaluating:
                    state.val_loss = row["val_loss"] = evaluate(engine, val_windows, trainer.eval_batches * trainer.global_batch, micro, rank, world_size)
                    row |= dynamics(engine, val_windows) if trainer.dynamics else {}
                metrics.log(row)
                step_metrics.logged(row)
            stopping = stop.agreed()
            if checkpointer.due(state.step, stopping):
                checkpointer.save(state)
            if stopping:
                return stopped(summaries.of("stopped", state, step_metrics.last_loss, checkpointer.latest()), metrics, rank)
        return finished(summaries, state, step_metrics.last_loss, checkpointer.latest(), metrics, rank)


def prepare_once(cfg: TrainConfig, rank: int) -> PreparedCorpus:
    """One process tokenises; the others then find the corpus in the cache."""
    if rank == 0:
        corpus = prepare(cfg.data)
    distributed.barrier()
    return corpus if rank == 0 else prepare(cfg.data, log=lambda _: None)


def build(cfg: TrainConfig, corpus: PreparedCorpus, device: torch.device, micro: int, world_size: int, resume_point: Path | None) -> tuple[TrainConfig, Engine]:
    """The model (its vocabulary from the corpus, its weights from trainer.init_from on a fresh start) in its
    engine, and the config completed by it."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, corpus.vocab_size, corpus.manifest["max_token_id"]).to(device)
    cfg = replace(cfg, model=model.cfg, arm=cfg.label)  # W&B groups runs by config.arm
    if cfg.trainer.init_from is not None and resume_point is None:
        load_model(model, str(Path(cfg.trainer.init_from) / "model.safetensors"))
    return cfg, build_engine(model, cfg, device, micro, world_size)


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.label}-{cfg.model.name}-lr{cfg.optim.lr:g}-s{cfg.trainer.seed}"


def start_record(cfg: TrainConfig, run_dir: RunDirectory, corpus: PreparedCorpus, state: TrainState, rank: int, resume_point: Path | None,
                 description: str) -> MetricsLogger:
    """Check the run's identity now that the corpus is known, record it with the resolved config (rank 0), and
    start the metrics."""
    identity = identity_of(cfg, corpus.path.name)
    amended = run_dir.check(identity, cfg.trainer.amend)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    tags = (f"variant:{cfg.label}", f"size:{cfg.model.name}", f"lr:{cfg.optim.lr:g}", f"seed:{cfg.trainer.seed}")  # W&B filters by these
    metrics = MetricsLogger(run_dir.path, cfg.logger, run_name(cfg), resolved, enabled=rank == 0, resume_step=state.step, wandb_id=state.wandb_id, tags=tags)
    state.wandb_id = metrics.wandb_id
    if rank == 0:
        run_dir.record(identity, amended, state.step)
        (run_dir.path / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        save_hydra_record(run_dir.path / ".hydra")
        print(f"{cfg.label} · {cfg.model.name}: {description}")
        if resume_point is not None:
            print(f"resuming from {resume_point} at step {state.step}")
    return metrics


def diverged(summaries: RunSummary, state: TrainState, checkpointer: Checkpointer, metrics: MetricsLogger, rank: int) -> Diverged:
    """A diverged run is a result too (an LR sweep records it), not a crash to retry: its summary is written."""
    last_good = checkpointer.latest()
    summary = summaries.of("diverged", state, math.nan, last_good)
    if rank == 0:
        summaries.write(summary)
    metrics.close(summary)
    return Diverged(f"the loss was not finite for {state.bad_in_a_row} steps in a row (up to step {state.step}); stopped, last good checkpoint: "
                    f"{last_good or 'none'}; lower optim.lr or raise trainer.max_bad_steps")


def stopped(summary: dict, metrics: MetricsLogger, rank: int) -> dict:
    if rank == 0:
        print(f"stop signal: saved {summary['checkpoint']}; the same command resumes from it")
    metrics.close(summary)
    return summary


def finished(summaries: RunSummary, state: TrainState, final_train_loss: float, final: Path, metrics: MetricsLogger, rank: int) -> dict:
    """Publish the last checkpoint's weights as the run's model, and write the summary with a sample from them."""
    summary = summaries.of("finished", state, final_train_loss, final)
    if rank == 0:
        weights = summaries.run_dir.path / "model.safetensors"
        copy_synced(final / "model.safetensors", weights)
        summary["sample"] = summaries.sample(weights)
        summaries.write(summary)
        print(f"final train loss {summary['final_train_loss']:.4f} · val loss {summary['final_val_loss']:.4f} · perplexity {math.exp(summary['final_val_loss']):.1f}")
        print(f"run directory: {summaries.run_dir.path}")
        print(f"sample: {summary['sample']!r}")
    metrics.close(summary)
    distributed.barrier()
    return summary


def save_hydra_record(folder: Path) -> None:
    """Hydra's own record of the start (its overrides and settings), written only once the run directory has
    accepted it, so a refused start leaves the record of the run it refused untouched."""
    if HydraConfig.initialized():
        folder.mkdir(exist_ok=True)
        OmegaConf.save(HydraConfig.get().overrides.task, folder / "overrides.yaml")
        OmegaConf.save({"hydra": HydraConfig.get()}, folder / "hydra.yaml")
