"""Checkpoints of the full training state: sealed, verified before they are loaded, kept K deep.

`<run_dir>/checkpoints/step-0000100/` holds the engine's files (model and optimizer: safetensors plus a
weights-only torch file, or DeepSpeed's partitioned files), one RNG file per rank, `trainer_state.json`
(step, counters, the W&B run id, the model config) and, written last, `manifest.json`: each file's size and
hash (mea.run_directory.seal). It is written under a temporary name, synced, sealed and renamed when complete,
so a kill or a full disk during a save leaves the previous checkpoint the latest, and a folder damaged later
is found by its manifest on resume and passed over.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError

from mea import distributed
from mea.config import ConfigError, TrainConfig
from mea.run_directory import CHECKPOINT_FORMAT, RunDirectory, damage, seal, sync_folder

from .engine import Engine
from .errors import TrainingError


@dataclass
class TrainState:
    """What a run carries from step to step, and a checkpoint saves: the step, the bad-loss counters, the losses
    since the last metrics row (so that a resumed curve is the uninterrupted one), the last validation loss and
    the W&B run to resume. The clock fields (not saved) time this process's part of the run."""
    step: int = 0
    bad_steps_total: int = 0
    bad_in_a_row: int = 0
    window_losses: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    wandb_id: str | None = None
    wall_time_s: float = 0.0  # of the processes before this one
    start_step: int = field(default=0, init=False)
    start_time: float = field(default_factory=time.perf_counter, init=False)

    def __post_init__(self):
        self.start_step = self.step

    def record(self, loss: float) -> None:
        """The step just taken, with its loss (NaN where the step was skipped)."""
        self.step += 1
        if math.isfinite(loss):
            self.bad_in_a_row = 0
            self.window_losses.append(loss)
        else:
            self.bad_in_a_row += 1
            self.bad_steps_total += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def saved(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init} | {"wall_time_s": self.wall_time_s + self.elapsed()}

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """From a checkpoint's trainer_state.json (which also holds the model's shape and the engine)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.init and f.name in saved})


class Checkpointer:
    """A run's checkpoints: when one is due, the sealed save (every rank takes part), the pruning to
    trainer.keep_checkpoints, and the load on resume."""

    def __init__(self, engine: Engine, run_dir: RunDirectory, cfg: TrainConfig):
        self.engine, self.run_dir = engine, run_dir
        self.every, self.last_step, self.keep = cfg.trainer.checkpoint_every, cfg.trainer.max_steps, cfg.trainer.keep_checkpoints
        self.shape = {"model": asdict(cfg.model), "attention": asdict(cfg.attention), "deepspeed": cfg.deepspeed.enabled}  # check_compatible reads it

    def due(self, step: int, stopping: bool) -> bool:
        return step == self.last_step or stopping or bool(self.every and step % self.every == 0)

    def save(self, state: TrainState) -> Path:
        return save(self.engine, self.run_dir, state.saved() | self.shape, self.keep)

    def load(self, folder: Path | None) -> TrainState:
        return TrainState() if folder is None else TrainState.from_saved(load(self.engine, folder))

    def latest(self) -> Path | None:
        kept = self.run_dir.checkpoints()
        return kept[-1] if kept else None


def failpoint(stage: str, step: int) -> None:
    """Fault injection for tests/test_faults.py: MEA_FAILPOINT=<stage>@<step> kills this process at that point of a save."""
    if os.environ.get("MEA_FAILPOINT") == f"{stage}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def compatible_resume_point(run_dir: RunDirectory, cfg: TrainConfig, rank: int) -> Path | None:
    """The checkpoint to resume from, verified by rank 0, agreed by every rank, and refused (before any compute)
    if it holds another model shape, variant or engine."""
    folder = find_resume_point(run_dir, cfg.trainer.resume, cfg.trainer.resume_from, rank)
    if folder is not None:
        check_compatible(folder, read_state(folder), asdict(cfg.model), asdict(cfg.attention), cfg.deepspeed.enabled)
    return folder


def find_resume_point(run_dir: RunDirectory, resume: bool, resume_from: str | None, rank: int) -> Path | None:
    if resume_from is not None:
        folder = Path(resume_from)
        if not (folder / "trainer_state.json").is_file():
            raise ConfigError(f"trainer.resume_from={resume_from!r} is not a checkpoint folder (no trainer_state.json); give a <run_dir>/checkpoints/step-* folder")
        if why := damage(folder):
            raise ConfigError(f"trainer.resume_from={resume_from!r} is damaged ({why}); give an earlier checkpoint folder")
        return folder
    return distributed.from_rank0(run_dir.latest_verified() if resume and rank == 0 else None)


def read_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def check_compatible(folder: Path, state: dict, model: dict, attention: dict, deepspeed_enabled: bool) -> None:
    """Refuse, before any compute, a checkpoint of another model shape, variant or engine."""
    for key, saved, wanted in (("model", state["model"], model), ("attention", state["attention"], attention)):
        diff = {k: (saved.get(k), v) for k, v in wanted.items() if k != "name" and v is not None and saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{key}.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"checkpoint {folder} does not fit this config ({detail}); use the same settings or a new run directory")
    if state["deepspeed"] != deepspeed_enabled:
        raise ConfigError(f"checkpoint {folder} was written {'with' if state['deepspeed'] else 'without'} DeepSpeed; resume with the same deepspeed setting")


def save(engine: Engine, run_dir: RunDirectory, state: dict, keep: int) -> Path:
    """Every rank calls this; rank 0 seals and publishes the folder once all ranks have written their part."""
    rank = distributed.rank()
    step = state["step"]
    final = run_dir.path / "checkpoints" / f"step-{step:07d}"
    if final.exists():
        return final
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    error = None
    try:
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        failpoint("engine-files", step)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk or a quota, as each writer reports it
        error = str(e).splitlines()[0]
    error = next((e for e in distributed.gathered(error) if e), None)  # the first rank's write error, on every rank
    if rank == 0 and error is None:
        try:
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "format": CHECKPOINT_FORMAT}, indent=1))
            failpoint("manifest", step)
            seal(tmp)
            failpoint("rename", step)
            tmp.rename(final)
            sync_folder(final.parent)
        except OSError as e:
            error = str(e).splitlines()[0]
    error = distributed.from_rank0(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = run_dir.checkpoints()
        raise TrainingError(f"could not write checkpoint {final.name} ({error}); {previous[-1].name if previous else 'no earlier checkpoint'} is intact: "
                            "free disk space (or raise the quota), then the same command resumes from it")
    if rank == 0:
        failpoint("prune", step)
        for old in run_dir.checkpoints()[:-keep]:  # the one just sealed is the newest verified, and always kept
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load(engine: Engine, folder: Path) -> dict:
    rank = distributed.rank()
    engine.load(folder)
    rng = folder / f"rng-rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return read_state(folder)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
