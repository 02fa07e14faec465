"""Training: the loop, the engines (plain PyTorch, DeepSpeed), checkpoints, optimizer and schedules, metrics."""
from .loop import TrainingError, run

__all__ = ["TrainingError", "run"]
