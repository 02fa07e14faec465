"""Metrics of a run: one JSON object per logged step in `metrics.jsonl`, mirrored to Weights & Biases."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from mea.config import LoggerConfig


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_name: str, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.mode == "disabled":
            return
        import wandb

        mode = cfg.mode
        if mode == "online" and not has_wandb_key():
            warnings.warn("W&B has no API key here (WANDB_API_KEY or `wandb login`); logging offline — `wandb sync` uploads it later", stacklevel=2)
            mode = "offline"
        init = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or run_name, tags=list(cfg.tags), config=config, dir=str(run_dir))
        try:
            self.wandb_run = wandb.init(mode=mode, **init)
        except Exception as e:  # an unreachable server must not cost the run
            if mode != "online":
                raise
            warnings.warn(f"W&B online init failed ({e}); logging offline — `wandb sync` uploads it later", stacklevel=2)
            self.wandb_run = wandb.init(mode="offline", **init)

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
