"""Batches of token windows: deterministic in (seed, step), split across ranks, resumable at any step.

Window i of a split is tokens [i·T, i·T + T + 1) of one shard (inputs and next-token targets). Each epoch visits
every window once in the order of a permutation seeded by (seed, epoch); the global batch of step s is the
slice [s·B, (s + 1)·B) of that endless sequence and rank r takes its r-th contiguous part. So a batch depends
on (seed, step, rank) alone: resuming at step s needs no replay, and ranks never overlap.
"""
from __future__ import annotations

import numpy as np
import torch


class TokenWindows:
    def __init__(self, shards: list[np.ndarray], seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.starts = np.cumsum([0] + counts)
        if self.starts[-1] == 0:
            raise ValueError(f"no window of {seq_len + 1} tokens fits in the split; lower data.seq_len or add text")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[shard])) * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def stack(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self[int(i)] for i in indices]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class Batches:
    """The rank's share of each step's global batch of `global_batch` windows."""

    def __init__(self, windows: TokenWindows, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"trainer.global_batch={global_batch} is not divisible by the world size {world_size}")
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        return self._order

    def indices(self, step: int) -> np.ndarray:
        per_rank = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * per_rank
        n = len(self.windows)
        return np.array([self.order(g // n)[g % n] for g in range(first, first + per_rank)], dtype=np.int64)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.stack(self.indices(step))


def validation_batches(windows: TokenWindows, n_windows: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """The rank's share of the validation split's first n_windows windows (the same set for every run and
    world size), in batches; ranks get equal counts so that they step together."""
    total = min(len(windows), n_windows) // (batch_size * world_size) * batch_size * world_size
    if total == 0:
        raise ValueError(f"the validation split has {len(windows)} windows, fewer than one batch of {batch_size} per rank; raise data.val_share")
    mine = np.arange(total)[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield windows.stack(mine[start : start + batch_size])
