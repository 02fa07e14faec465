"""Where a benchmark ran, as every script prints it, and the wait that makes GPU timings honest."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def describe(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses (ratios differ between CPU models)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"CPU {names[0] if names else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
