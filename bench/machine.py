"""Where a benchmark ran, as every script prints it, the limits of that machine measured in the same run, and the
wait that makes GPU timings honest."""
from __future__ import annotations

import platform
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the yardstick of MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, reps=50 if device.type == "cuda" else 5)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of copying a tensor far larger than the caches (read once, written once), the yardstick of decoding."""
    src = torch.ones(256 << 20 if device.type == "cuda" else 64 << 20, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds_per_call(lambda: dst.copy_(src), device, reps=20 if device.type == "cuda" else 5)


def seconds_per_call(work, device: torch.device, reps: int) -> float:
    """Seconds of one call of work, averaged over reps calls after three untimed ones."""
    for _ in range(3):
        work()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        work()
    sync(device)
    return (time.perf_counter() - start) / reps


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes held at once by tensors made inside the block (each storage once, until it is freed): a step's
    activations, gradients and temporaries, without the weights and optimizer state made before it. A CPU has no
    allocator peak to read; this counts what eager PyTorch allocates, on any device (not inside compiled code)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.held = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (storage := t.untyped_storage())._cdata not in self.held:
                self.held.add(storage._cdata)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.freed, storage._cdata, storage.nbytes())
        return out

    def freed(self, key: int, nbytes: int) -> None:
        self.held.discard(key)
        self.live -= nbytes
