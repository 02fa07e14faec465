"""The process group and every collective mea makes, in one place (as lingua keeps them in its distributed.py).

Every tensor handed to the backend lives on the backend's own device: NCCL reads CUDA tensors only, gloo CPU
tensors. The other way, a group started as `cpu:gloo,cuda:nccl` so that CPU tensors go through gloo, was not
chosen: gloo then needs its own TCP connections between every pair of ranks across nodes, a second thing that a
cluster's network (its interface choice, its firewall) can break, while the values reduced here (losses, the
finite flag, evaluation sums) are on the GPU already. Without a process group (one plain process) each function
returns the local value.
"""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start(device: torch.device, through_deepspeed: bool = False) -> tuple[int, int]:
    """Start the process group of torchrun's environment (one process without it); (rank, world size).

    Through DeepSpeed when it trains (deepspeed.init_distributed starts torch's group and its own comm layer)."""
    if launched_world_size() == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":  # before the group starts: NCCL binds each rank to its current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if through_deepspeed:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend_for(device), verbose=False)
    elif not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return rank(), world_size()


def stop() -> None:
    """End the process group, after every rank's collectives are done and with the groups DeepSpeed keeps.

    Why the barrier: gloo's worker thread drops its last reference to a finished collective after the caller has
    moved on, and where that collective's tensors belong to Python objects, the drop takes the GIL. At interpreter
    shutdown Python ends such a thread instead, and the process aborts ("terminate called without an active
    exception": tests/engine_probe.py, 2 of 20 runs under load, the core showing AsyncAllgatherWork's destructor in
    ProcessGroupGloo::runLoop reaching pybind11's GIL; PyTorch pull request 179291 describes the same). The
    barrier, which holds no tensors, is a round trip to every rank after the last collective, by which the drop
    is done. Destroying alone does not end the threads: the world group's two outlive it even with every engine
    closed (a reference held where Python's collector cannot see). Through DeepSpeed's comm where DeepSpeed
    started the group: it also releases DeepSpeed's copy of the world group.

    train.py calls it once its process's runs are done; NCCL asks for it at a normal exit, so that no rank leaves
    while another still waits on it."""
    if not dist.is_initialized():
        return
    dist.barrier()
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The processes torchrun (or SLURM through it) started, known before the group starts."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def collective_device() -> torch.device:
    """The device whose tensors the running backend reads."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_rank0(value):
    """Rank 0's value (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value) -> list:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def summed_(tensor: torch.Tensor) -> torch.Tensor:
    """tensor summed over the ranks, in place; it must already be on collective_device()."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank's tensors are all finite (one reduction, one device-to-host copy)."""
    finite = torch.stack([t.float() for t in tensors]).isfinite().all().float().to(collective_device())
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def any_rank(flag: bool) -> bool:
    """Whether any rank's flag is set (a stop signal seen by one rank stops all)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(value: float) -> float:
    """The mean of a number over the ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
