"""What every study is built from, over the library: its training runs (LocalRuns: subprocesses that resume or skip
by themselves, side by side as the sweep's are; mea.studies.cluster.SlurmRuns, the same as SLURM jobs), and the
noise rule its claims are read with.
A study (mea.studies.*) is a spec plus a little code on top of these, mea.scaling.sweep and the tools."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mea.run_directory import RunDirectory, describe
from mea.scaling.effects import difference
from mea.scaling.sweep import ROOT, Launcher, SweepError, SweepSpec, SweepStopped, planned_identity, run_side_by_side, run_sweep


class LocalRuns:
    """How a study's training runs are carried out on this machine: one at a time (`train`), or side by side as
    the sweep's multiruns are (`side_by_side`: mea.scaling.sweep.run_side_by_side, each run a session of its own
    that a stop signal reaches, so it saves). Each run resumes or skips by itself, and a run directory that holds
    another run is refused. Made from an archive, a run the archive lacks is an error, not a run started behind
    the reader's back."""

    def __init__(self, archive: Path | None = None, launcher: Launcher | None = None):
        self.archive, self.launcher = archive, launcher or Launcher()

    def sweep(self, spec: SweepSpec) -> Path:
        """An LR sweep's runs (mea.scaling.sweep), or from an archive its results alone; its results.csv."""
        return run_sweep(spec, self.launcher, collect_only=self.archive is not None)

    def train(self, run_dir: Path, overrides: list[str]) -> dict:
        """One training run, on every thread this process may use; its summary."""
        self.start({run_dir: overrides}, {}, 1)
        return json.loads((run_dir / "summary.json").read_text())

    def side_by_side(self, runs: dict[Path, list[str]]) -> None:
        """Independent runs, `jobs` at once of `threads` threads each."""
        self.start(runs, self.launcher.environment(), self.launcher.local_jobs(len(runs)))

    def start(self, runs: dict[Path, list[str]], env: dict[str, str], at_once: int) -> None:
        """Every run is checked before any starts, and every one is left to finish before the first failure is
        raised, so that one failed run stops none of the others half-way."""
        for run_dir, overrides in runs.items():
            self.refuse_another_run(run_dir, overrides)
        to_train = {run_dir: overrides for run_dir, overrides in runs.items() if not (run_dir / "summary.json").is_file()}  # finished or diverged: results already
        commands = [[sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"] for run_dir, overrides in to_train.items()]
        codes, stopped = run_side_by_side(commands, env, at_once)
        if stopped is not None:
            raise SweepStopped(stopped)
        for run_dir, code in zip(to_train, codes):
            if not (run_dir / "summary.json").is_file():
                raise SweepError(f"the run {run_dir} failed (exit {code}); run the experiment again to resume it")

    def refuse_another_run(self, run_dir: Path, overrides: list[str]) -> None:
        """Stop where run_dir holds a run of other settings, or, while a report is made from its archive, none at all."""
        if changes := RunDirectory(run_dir).differences(planned_identity(overrides)):
            raise SweepError(f"{run_dir} holds another run than the spec now asks ({describe(changes)}); give the experiment a new `out` or delete that run")
        if self.archive is not None and not (run_dir / "summary.json").is_file():
            raise SweepError(f"{self.archive} has no finished run {run_dir}: it was made from another spec; give the spec the report was made with")


def within_noise(delta: float, se: float) -> bool:
    return se > 0 and abs(delta) <= 2 * se


NO_NOISE_ESTIMATE = "one seed: no noise estimate"


def verdict(delta: float, se: float, better_if_negative: bool = True) -> str:
    """Agrees or disagrees only where a standard error says how far Δ is from noise; one seed an arm has none."""
    if not math.isfinite(delta):
        return "not measured"
    if not se > 0:
        return NO_NOISE_ESTIMATE
    if within_noise(delta, se):
        return "within noise (|Δ| ≤ 2 standard errors)"
    return "agrees" if (delta < 0) == better_if_negative else "disagrees"


def standard_error(a: dict, b: dict) -> float:
    return math.sqrt(a["final_val_loss_std"] ** 2 / a["seeds"] + b["final_val_loss_std"] ** 2 / b["seeds"])


def reading(a: dict, b: dict, better_if_negative: bool = True) -> str:
    """Δ = a − b between two comparison rows (mea.tools.compare): the 2-SE verdict, the Welch 95% interval over
    seeds, and how many seeds an arm would resolve it (or, within noise, the smallest Δ these seeds could see)."""
    d = difference(a["final_val_losses"], b["final_val_losses"])
    said = verdict(d.delta, standard_error(a, b), better_if_negative)
    if d.interval is None:
        return said if said == NO_NOISE_ESTIMATE else f"{said}; one seed an arm: no interval"
    power = (f"these seeds could see a Δ of {d.smallest_seen:.4f} (80% power); {d.seeds_to_resolve} seeds an arm would resolve this one"
             if within_noise(d.delta, standard_error(a, b)) else f"{d.seeds_to_resolve} seeds an arm resolve it")
    return f"{said}, 95% interval {d.interval[0]:+.4f} to {d.interval[1]:+.4f} (Welch); {power}"
