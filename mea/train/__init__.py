"""Training: the loop, the engines (plain PyTorch, DeepSpeed), checkpoints, optimizer and schedules, metrics."""
from .errors import Diverged, TrainingError
from .loop import StopFlag, run

__all__ = ["Diverged", "StopFlag", "TrainingError", "run"]
