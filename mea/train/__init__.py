"""Training: the loop, the optimizer and schedules, metrics."""
from .loop import run

__all__ = ["run"]
