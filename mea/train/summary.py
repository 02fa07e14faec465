"""A run's summary: one record, with the same keys, for a finished, a diverged and a stopped run.

A finished or diverged run writes it to `summary.json` (a diverged run is a result an LR sweep records, and a
run directory holding either is done); a stopped run only returns it, since the same command resumes it.
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch
from safetensors.torch import load_model

from mea.config import TrainConfig
from mea.data import PreparedCorpus
from mea.models import LM
from mea.run_directory import RunDirectory, write_synced
from mea.runs import code_version

from .checkpoint import TrainState

STATUSES = ("finished", "diverged", "stopped")


class RunSummary:
    """What the summary says of the run besides its state: counts, the corpus, the place, the world."""

    def __init__(self, cfg: TrainConfig, run_dir: RunDirectory, corpus: PreparedCorpus, counts: dict[str, int], flops_per_token: float, world_size: int,
                 training_windows: int, device: torch.device):
        self.cfg, self.run_dir, self.corpus, self.counts, self.flops_per_token = cfg, run_dir, corpus, counts, flops_per_token
        self.world_size, self.training_windows = world_size, training_windows
        self.device = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} {device.type.upper()}"  # where it trained, for a report

    def of(self, status: str, state: TrainState, final_train_loss: float, checkpoint: Path | None, sample: str = "") -> dict:
        assert status in STATUSES, status
        trainer, diverged = self.cfg.trainer, status == "diverged"
        tokens_per_step = trainer.global_batch * self.cfg.data.seq_len
        return {
            "variant": self.cfg.label,
            "model": self.cfg.model.name,
            "status": status,
            "diverged": diverged,
            "params": self.counts["total"],
            "non_embedding_params": self.counts["non_embedding"],
            "flops_per_token": self.flops_per_token,
            "steps": state.step,
            "tokens": state.step * tokens_per_step,
            "passes": state.step * trainer.global_batch / self.training_windows,  # over the training split: above ~4, data repeats too often
            "final_train_loss": math.nan if diverged else final_train_loss,
            "final_val_loss": math.nan if diverged else state.val_loss,
            "bad_steps": state.bad_steps_total,
            "wall_time_s": state.saved()["wall_time_s"],
            "tokens_per_s": (state.step - state.start_step) * tokens_per_step / state.elapsed(),
            "world_size": self.world_size,
            "device": self.device,
            "run_dir": str(self.run_dir.path),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "data": self.corpus.path.name,
            "data_content": self.corpus.content,
            "code": code_version(),
            "sample": sample,
        }

    def write(self, summary: dict) -> None:
        write_synced(self.run_dir.path / "summary.json", json.dumps(summary, indent=1))

    def sample(self, weights: Path) -> str:
        """A short generation from the saved weights, on one CPU process whatever the training engine was."""
        trainer = self.cfg.trainer
        model = LM(self.cfg.model, self.cfg.attention).eval()
        load_model(model, str(weights))
        ids = torch.tensor([self.corpus.tokenizer.encode(trainer.sample_prompt, add_special_tokens=False).ids])
        out = model.generate(ids, trainer.sample_tokens, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
        return self.corpus.tokenizer.decode(out[0].tolist())


def finished_summary(run_dir: Path, max_steps: int) -> dict | None:
    """The summary of a run that already reached max_steps or diverged, so that running it again does nothing."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("diverged") or summary.get("steps") == max_steps else None
