"""`mea-launch slurm --smoke`: the first job to run on a new cluster, on the shape a training run will use.

    torchrun ... -m mea.tools.cluster_check RUN_DIR [overrides]

Every rank runs four checks and rank 0 writes one line per check to RUN_DIR/cluster-check/report.txt:
- rendezvous: the ranks found each other, as many as torchrun was told, on the nodes SLURM gave;
- run directory: each rank writes a file there and reads every other rank's (the storage is shared);
- all-reduce: a 64 MiB tensor summed across all ranks is exact, with its measured bus bandwidth;
- first losses: each rank builds the config's model from its seed and takes three optimizer steps on the
  config's first batch on its own; the losses must agree across ranks (the same code, libraries and data).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch

from mea import distributed
from mea.config import ConfigError, compose_config
from mea.run_directory import write_synced

REPORT = Path("cluster-check") / "report.txt"
ALL_REDUCE_BYTES = 64 * 2**20


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_rendezvous(seconds: float) -> tuple[bool, str]:
    nodes = distributed.gathered(node_name())
    expected = int(os.environ["WORLD_SIZE"])
    return distributed.world_size() == expected, (f"{distributed.world_size()} of {expected} ranks on {len(set(nodes))} node(s) ({', '.join(sorted(set(nodes)))}) "
                                              f"through {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} in {seconds:.1f} s")


def check_run_directory(run_dir: Path) -> tuple[bool, str]:
    folder = run_dir / REPORT.parent
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"rank-{distributed.rank()}"
    write_synced(mine, node_name())
    distributed.barrier()
    missing = [rank for rank in range(distributed.world_size()) if not (folder / f"rank-{rank}").is_file()]
    unseen = [m for m in distributed.gathered(missing) if m]
    distributed.barrier()
    mine.unlink()
    if unseen:
        return False, f"{sum(map(len, unseen))} rank file(s) in {folder} were not visible to other ranks: put the run directory on storage every node mounts"
    return True, f"every rank wrote to {run_dir} and read every other rank's file"


def check_all_reduce(device: torch.device, repeats: int = 5) -> tuple[bool, str]:
    n = distributed.world_size()
    x = torch.empty(ALL_REDUCE_BYTES // 4, device=device)
    x.fill_(distributed.rank() + 1)
    distributed.summed_(x)  # the warm-up call also checks the sum
    exact = bool((x == n * (n + 1) / 2).all())
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        distributed.summed_(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    bus = 2 * (n - 1) / n * ALL_REDUCE_BYTES / seconds / 1e9  # the ring all-reduce's bytes per rank, as nccl-tests report it
    return exact, f"{ALL_REDUCE_BYTES >> 20} MiB across {n} ranks in {seconds * 1e3:.1f} ms, bus bandwidth {bus:.2f} GB/s, {'exact' if exact else 'WRONG SUM'}"


def check_first_losses(overrides: list[str], device: torch.device, steps: int = 3) -> tuple[bool, str]:
    from omegaconf import OmegaConf

    from mea.data import Batches, TokenWindows, prepare
    from mea.train.loop import build_model, resolve
    from mea.train.optim import build_optimizer

    cfg = resolve(OmegaConf.to_object(compose_config(overrides)), device)
    corpus = prepare(cfg.data) if distributed.rank() == 0 else None
    distributed.barrier()  # one rank tokenises; the others find it in the cache (MEA_CACHE, on shared storage)
    corpus = corpus or prepare(cfg.data, log=lambda _: None)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, corpus.vocab_size, corpus.manifest["max_token_id"]).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    x, y = Batches(TokenWindows(corpus.shards("train"), cfg.data.seq_len), cfg.trainer.global_batch, seed=cfg.trainer.seed)(0)
    losses = []
    for _ in range(steps):
        loss = model(x.to(device), y.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    every = torch.tensor(distributed.gathered(losses))
    spread = (every.max(0).values - every.min(0).values).max().item()
    agree = spread <= 1e-5 * every.abs().max().item()
    shown = ", ".join(f"{v:.4f}" for v in losses)
    return agree, f"{steps} steps of {cfg.model.name}/{cfg.label} on every rank: {shown}; largest spread across ranks {spread:.2e}"


def main(argv: list[str]) -> int:
    run_dir, overrides = Path(argv[0]), argv[1:]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else torch.device("cpu")
    start = time.perf_counter()
    distributed.start(device)
    results = {"rendezvous": check_rendezvous(time.perf_counter() - start), "run directory": check_run_directory(run_dir),
               "all-reduce": check_all_reduce(device)}
    try:
        results["first losses"] = check_first_losses(overrides, device)
    except ConfigError as e:
        results["first losses"] = (False, str(e))
    lines = "".join(f"{'PASS' if ok else 'FAIL'} {name}: {detail}\n" for name, (ok, detail) in results.items())
    if distributed.rank() == 0:
        write_synced(run_dir / REPORT, lines)
        print(lines, end="", flush=True)
    distributed.stop()
    return 0 if all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
