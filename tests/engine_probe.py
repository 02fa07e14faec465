"""Run under torchrun by tests/test_distributed.py: the collectives of mea.distributed and the engines' steps on
several CPU processes (gloo), recorded as JSON for the test to check.

    torchrun --nproc_per_node 2 tests/engine_probe.py OUT.json
"""
from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mea import distributed  # noqa: E402
from mea.config import DeepSpeedConfig, SchedulerConfig, TrainConfig, TrainerConfig  # noqa: E402
from mea.models import LM, REGISTRY, ModelConfig  # noqa: E402
from mea.train.engine import build_engine  # noqa: E402

VOCAB, T, BATCH, MICRO = 64, 16, 8, 2
POISON = VOCAB - 1  # the token whose embedding row is NaN: a micro-batch holding it has a NaN loss


def config(variant: str, stage: int | None, precision: str, max_steps: int) -> TrainConfig:
    return TrainConfig(model=ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seq_len=T), attention=REGISTRY[variant].Config(),
                       scheduler=SchedulerConfig(warmup_steps=5), trainer=TrainerConfig(max_steps=max_steps, global_batch=BATCH, precision=precision),
                       deepspeed=DeepSpeedConfig(enabled=stage is not None, stage=stage or 0))


def engine_for(cfg: TrainConfig, poisoned: bool = False):
    torch.manual_seed(0)
    model = LM(cfg.model, cfg.attention)
    if poisoned:
        with torch.no_grad():
            model.embed.weight[POISON] = math.nan
    return build_engine(model, cfg, torch.device("cpu"), MICRO, distributed.world_size())  # the plain engine takes the whole batch


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, POISON, (BATCH, T + 1), generator=torch.Generator().manual_seed(step))  # never the poisoned token


def step(engine, x: torch.Tensor, deepspeed: bool) -> tuple[float, float]:
    if deepspeed:  # this rank's share of the global batch, as mea.data.Batches deals it
        share = BATCH // distributed.world_size()
        x = x[distributed.rank() * share : (distributed.rank() + 1) * share]
    return engine.train_step(x[:, :-1], x[:, 1:])


def collectives() -> dict:
    r = distributed.rank()
    return {"from_rank0": distributed.from_rank0(f"rank {r}"), "gathered": distributed.gathered(r), "summed": distributed.summed_(torch.tensor([r + 1.0])).tolist(),
            "all_finite": distributed.all_finite([torch.tensor(1.0), torch.tensor(math.nan if r == 1 else 1.0)]),
            "all_finite_clean": distributed.all_finite([torch.tensor(1.0)]), "any_rank": distributed.any_rank(r == 1), "any_rank_none": distributed.any_rank(False),
            "mean": distributed.mean(float(r + 1))}


def bf16_curves(steps: int = 20) -> dict:
    """Each variant's loss curve in bf16 under the plain engine and DeepSpeed 0-3, and the dtypes its weights are held in."""
    out = {}
    for variant in ("mea", "tha"):
        for stage in (None, 0, 1, 2, 3):
            with engine_for(config(variant, stage, "bf16", steps)) as engine:
                losses = [step(engine, batch(i % 4), stage is not None)[0] for i in range(steps)]  # four batches again and again: a curve that falls
                module = engine.engine.module if stage is not None else engine.model
                dtypes = sorted({str(getattr(p, "ds_tensor", p).dtype) for p in module.parameters()})
            out[f"{variant}/{'plain' if stage is None else stage}"] = {"losses": losses, "dtypes": dtypes}
    return out


def flat_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree.detach().clone()]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in flat_tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in flat_tensors(item)]
    return []


def snapshot(engine) -> dict:
    with engine.full_parameters():  # every rank sees the whole weights, ZeRO-3's partitions gathered
        weights = [p.detach().clone() for p in engine.model.parameters()]
    return {"weights": weights, "optimizer": flat_tensors(engine.engine.optimizer.state_dict()),
            "schedule": engine.engine.lr_scheduler.state_dict()["last_epoch"], "lr": engine.lr}


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.nan_to_num(nan=7.0), y.nan_to_num(nan=7.0)) for x, y in zip(a, b))


def non_finite_steps() -> dict:
    """At each stage, the poisoned micro-batch first or last of rank 1's share: the step is skipped on every rank,
    and the next step trains."""
    out = {}
    for stage in (0, 1, 2, 3):
        for where in ("first", "last"):
            with engine_for(config("mea", stage, "fp32", 10), poisoned=True) as engine:
                step(engine, batch(0), True)
                before = snapshot(engine)
                x = batch(1)
                share = BATCH // distributed.world_size()
                x[share + (0 if where == "first" else share - MICRO), 3] = POISON  # rank 1's first or last micro-batch
                loss, grad_norm = step(engine, x, True)
                after = snapshot(engine)
                next_loss, _ = step(engine, batch(2), True)
                trained = snapshot(engine)
            out[f"{stage}/{where}"] = {
                "loss": loss, "grad_norm": grad_norm, "weights_kept": same(before["weights"], after["weights"]),
                "optimizer_kept": same(before["optimizer"], after["optimizer"]), "schedule": [before["schedule"], after["schedule"], trained["schedule"]],
                "lr": [before["lr"], after["lr"]], "next_loss": next_loss, "next_trained": not same(after["weights"], trained["weights"]),
            }
    return out


def live_storages() -> list[tuple[int, list[int]]]:
    """(bytes, shape) of every tensor storage alive in this process, largest first."""
    gc.collect()
    storages = {t.untyped_storage().data_ptr(): (t.untyped_storage().nbytes(), list(t.shape)) for t in gc.get_objects() if isinstance(t, torch.Tensor)}
    return sorted(storages.values(), reverse=True)


def memory() -> dict:
    """At each ZeRO stage, after a step: the bytes of every tensor this rank holds, and the model's."""
    out = {}
    for stage in (1, 2, 3):
        with engine_for(config("mea", stage, "fp32", 4)) as engine:
            step(engine, batch(0), True)
            live = live_storages()
            out[str(stage)] = {"live": live[:5], "live_bytes": sum(nbytes for nbytes, _ in live), "model_bytes": engine.model.parameter_counts()["total"] * 4}
    return out


def main(out: Path) -> None:
    distributed.start(torch.device("cpu"), through_deepspeed=True)
    torch.set_num_threads(1)
    results = {"collectives": collectives(), "bf16": bf16_curves(), "non_finite": non_finite_steps(), "memory": memory()}
    every = distributed.gathered(results)
    if distributed.rank() == 0:
        out.write_text(json.dumps(every))
    distributed.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
