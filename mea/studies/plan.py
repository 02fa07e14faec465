"""`mea-experiment SPEC --plan`: what a sitting will cost, from the spec alone, before its first job.

For each stage: its runs (and how many of them the run folder already holds finished: those cost nothing),
tokens, training FLOPs (each run's model's own `flops_per_token`), GPU-hours, and wall time on the GPUs the
stage's `resources` ask for; then the totals. The rate comes from a measurement, never from an assumption: `make
gpu-check`'s throughput table (the training FLOP/s a GPU that each variant reached there, carried to the spec's
sizes at that rate), or an MFU the user states with the card's peak. It asks no scheduler and trains nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from mea.config import ConfigError, batch_plan
from mea.models import flops_per_token
from mea.scaling.sweep import SweepError, compose_run
from mea.train.metrics import KNOWN_PEAK_TFLOPS


@dataclass
class Rates:
    """Training FLOP/s one GPU reaches, per attention variant (or one rate for all, from a stated MFU)."""

    per_variant: dict[str, float]
    every_variant: float | None
    source: str

    @classmethod
    def from_table(cls, path: Path) -> Rates:
        """From `make gpu-check`'s throughput table (runs/gpu-check/<card>-<date>.json): each variant's plain-engine run."""
        if not path.is_file():
            raise SweepError(f"--throughput {path} does not exist; give the .json that `make gpu-check` writes beside its table")
        table = json.loads(path.read_text())
        rows = [r for r in table["rows"] if r["engine"] == "none"]
        if not rows:
            raise SweepError(f"--throughput {path} has no plain-engine row; give a table written by `make gpu-check`")
        rates = {r["variant"]: r["tokens_per_s"] * r["flops_per_token"] / r["gpus"] for r in rows}
        return cls(rates, None, f"measured on {table['card']} by `make gpu-check` ({path.name}; model={rows[0]['model']}, T {rows[0]['seq_len']}): "
                                + ", ".join(f"{v} {f / 1e12:.0f}" for v, f in rates.items()) + " TFLOP/s a GPU")

    @classmethod
    def from_mfu(cls, mfu: float, gpu: str | None, peak_tflops: float | None) -> Rates:
        if not 0 < mfu <= 1:
            raise SweepError(f"--mfu {mfu}: give the share of the card's peak a run reaches, between 0 and 1 (e.g. 0.35)")
        peak = peak_tflops or next((tflops for key, tflops in KNOWN_PEAK_TFLOPS.items() if gpu and key.lower() in gpu.lower()), None)
        if peak is None:
            raise SweepError(f"--mfu needs the card's peak: give --gpu ({', '.join(KNOWN_PEAK_TFLOPS)}) or --peak-tflops")
        return cls({}, mfu * peak * 1e12, f"MFU {mfu:g} stated, of {peak:g} TFLOP/s a GPU ({gpu or 'the peak given'})")

    def flops_per_s(self, variant: str) -> float:
        if variant in self.per_variant:
            return self.per_variant[variant]
        if self.every_variant is None:
            raise SweepError(f"the throughput table has no {variant} row (it has {', '.join(self.per_variant)}); run `make gpu-check` on this code, or give --mfu")
        return self.every_variant


@dataclass
class StageCost:
    stage: str
    runs: int
    done: int
    tokens: float
    flops: float
    gpu_hours: float
    longest_run_hours: float  # wall time of the stage when its runs go side by side, one allocation each


def run_cost(overrides: list[str], given, rates: Rates) -> tuple[float, float, float]:
    """(tokens, FLOPs, GPU-seconds) of one run on the resources given it; ConfigError where its batch does not split over them."""
    cfg = OmegaConf.to_object(compose_run([*overrides, f"deepspeed={given.deepspeed}"]))
    model = replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)  # the tokenizer's, which data.vocab_size sets
    tokens = cfg.trainer.max_steps * batch_plan(cfg, given.gpus).tokens_per_step
    flops = tokens * flops_per_token(model, cfg.attention, cfg.data.seq_len)
    return tokens, flops, flops / rates.flops_per_s(cfg.attention.name)


def stage_cost(stage: str, runs: dict[Path, list[str]], given, rates: Rates) -> StageCost:
    """A stage's cost, each of its runs on `given` (experiment.Resources); a run whose folder holds a summary is done.
    Its overrides are composed once per shape, which checks that the batch splits over the run's ranks."""
    costs, done, per_run = {}, 0, []
    for run_dir, overrides in runs.items():
        if (run_dir / "summary.json").is_file():
            done += 1
            continue
        shape = tuple(o for o in overrides if not o.startswith(("optim.lr=", "trainer.seed=", "logger.")))
        if shape not in costs:
            try:
                costs[shape] = run_cost(overrides, given, rates)
            except (ConfigError, SweepError) as e:
                raise SweepError(f"resources.{stage} ({given.nodes} × {given.gpus_per_node} GPUs): {e}") from None
        per_run.append(costs[shape])
    tokens, flops, gpu_s = (sum(c[i] for c in per_run) for i in range(3))
    return StageCost(stage, len(runs), done, tokens, flops, gpu_s / 3600, max((c[2] for c in per_run), default=0.0) / given.gpus / 3600)


def plan(stages: dict[str, dict[Path, list[str]]], resources_of, rates: Rates) -> list[StageCost]:
    """Every stage that has runs, costed on the resources resources_of(stage) gives each of its runs."""
    return [stage_cost(stage, runs, resources_of(stage), rates) for stage, runs in stages.items() if runs]


def render(costs: list[StageCost], resources_of, rates: Rates) -> str:
    lines = [f"Rate: {rates.source}.", "", "| stage | runs | done | tokens | FLOPs | GPUs a run | GPU-hours | wall time (its runs side by side) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c.stage} | {c.runs} | {c.done} | {c.tokens:.3g} | {c.flops:.3g} | {resources_of(c.stage).gpus} | {c.gpu_hours:.3g} | {c.longest_run_hours:.3g} h |")
    total = StageCost("total", *(sum(getattr(c, k) for c in costs) for k in ("runs", "done", "tokens", "flops", "gpu_hours", "longest_run_hours")))
    lines.append(f"| **total** | {total.runs} | {total.done} | {total.tokens:.3g} | {total.flops:.3g} | | **{total.gpu_hours:.3g}** | {total.longest_run_hours:.3g} h |")
    return "\n".join(lines + ["", "Done: runs whose folder already holds a summary (they cost nothing again). Wall time: the stages one after another, "
                                  "each stage's runs side by side as far as the cluster grants them, so each stage takes its longest run. Not counted: an LR bracket's "
                                  "extension, one run an arm whose best lies at an edge of its factors."]) + "\n"
