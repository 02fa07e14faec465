"""Heap settings for eager training on a CPU, where PyTorch's allocator is glibc's malloc."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 4 << 30, M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Keeps the memory that a training step frees in the process's heap for the next step (glibc only).

    By default glibc hands large blocks (activations, gradients) straight back to the kernel when they are freed
    and the next step faults them in again, page by page, zeroed: the step pays for it, by an amount that changes
    with whatever ran before (up to 14% for `tha` at the CPU bench size, and most of the bench's round-to-round
    noise). Blocks up to 32 MiB now come from the heap, which is trimmed only past 4 GiB free and grows by
    256 MiB at a time: the process keeps its peak step's memory, as the CUDA caching allocator does on a GPU.
    Returns whether the settings took (false off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return hasattr(libc, "mallopt") and all(libc.mallopt(option, value) == 1 for option, value in SETTINGS.items())
