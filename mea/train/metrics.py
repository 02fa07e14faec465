"""Metrics of a run: one JSON object per logged step in `metrics.jsonl`, mirrored to Weights & Biases."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from mea.config import LoggerConfig
from mea.run_directory import write_synced

# Dense bf16 matrix-multiply peaks, for MFU where trainer.peak_tflops is not given.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in KNOWN_PEAK_TFLOPS.items() if key in name), None)


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def truncate_after(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint, so a resumed curve has no duplicates."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_synced(path, "".join(line + "\n" for line in rows))


class StepMetrics:
    """The row of a logged step: the mean loss since the last row, the LR and gradient norm, throughput since the
    last row (the evaluation before it excluded), MFU where a peak is known, and the GPU memory peak."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, device: torch.device, peak_tflops: float | None, start_step: int):
        self.tokens_per_step, self.flops_per_token, self.world_size, self.device = tokens_per_step, flops_per_token, world_size, device
        self.peak = peak_flops(device, peak_tflops)
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.last_loss = math.nan
        if device.type == "cuda":  # this run's peak, not that of a run before it in the same process (a multirun)
            torch.cuda.reset_peak_memory_stats(device)

    def row(self, step: int, losses: list[float], lr: float, grad_norm: float, bad_steps: int) -> dict:
        tokens_per_s = (step - self.last_step) * self.tokens_per_step / (time.perf_counter() - self.last_time)
        row = {"step": step, "tokens": step * self.tokens_per_step, "loss": sum(losses) / len(losses) if losses else math.nan,
               "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "bad_steps": bad_steps}
        if self.peak:
            row["mfu"] = tokens_per_s * self.flops_per_token / self.world_size / self.peak
        if self.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row

    def logged(self, row: dict) -> None:
        """The window of the next row starts now, after this one's evaluation."""
        self.last_step, self.last_time, self.last_loss = row["step"], time.perf_counter(), row["loss"]


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_name: str, config: dict, enabled: bool = True, resume_step: int = 0, wandb_id: str | None = None,
                 tags: tuple[str, ...] = ()):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(run_dir / "metrics.jsonl", resume_step)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.mode == "disabled":
            return
        import wandb

        mode = cfg.mode
        if mode == "online" and not has_wandb_key():
            warnings.warn("W&B has no API key here (WANDB_API_KEY or `wandb login`); logging offline — `wandb sync` uploads it later", stacklevel=2)
            mode = "offline"
        init = dict(
            project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or run_name, tags=[*cfg.tags, *tags],
            config=config, dir=str(run_dir), id=wandb_id, resume="allow" if wandb_id else None,
        )
        try:
            self.wandb_run = wandb.init(mode=mode, **init)
        except Exception as e:  # an unreachable server must not cost the run
            if mode != "online":
                raise
            warnings.warn(f"W&B online init failed ({e}); logging offline — `wandb sync` uploads it later", stacklevel=2)
            self.wandb_run = wandb.init(mode="offline", **init)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb_run.finish()
