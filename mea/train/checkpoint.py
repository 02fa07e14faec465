"""Checkpoints of the full training state, written atomically and kept K deep.

`<run_dir>/checkpoints/step-0000100/` holds the engine's files (model and optimizer: safetensors plus a
weights-only torch file, or DeepSpeed's partitioned files), one RNG file per rank and `trainer_state.json`
(step, counters, the W&B run id, the model config). It is written under a temporary name and renamed when
complete, so a kill during a save leaves the previous checkpoint the latest good one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mea.config import ConfigError

from .engine import Engine


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def find_resume_point(run_dir: Path, resume: bool, resume_from: str | None) -> Path | None:
    if resume_from is not None:
        folder = Path(resume_from)
        if not (folder / "trainer_state.json").is_file():
            raise ConfigError(f"trainer.resume_from={resume_from!r} is not a checkpoint folder (no trainer_state.json); give a <run_dir>/checkpoints/step-* folder")
        return folder
    found = checkpoints(run_dir) if resume else []
    return found[-1] if found else None


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


def save(engine: Engine, run_dir: Path, state: dict, keep: int) -> Path:
    """Every rank calls this; rank 0 publishes the folder once all ranks have written their part."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    if final.exists():
        return final
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def load(engine: Engine, folder: Path) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
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
