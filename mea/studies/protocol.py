"""What every study is built from, over the library: one training run as a subprocess that resumes or skips by
itself (and refuses a run directory that holds another run), and the noise rule its claims are read with.
A study (mea.studies.*) is a spec plus a little code on top of these, mea.scaling.sweep and the tools."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mea.run_directory import RunDirectory, describe
from mea.scaling.effects import difference
from mea.scaling.sweep import ROOT, Launcher, SweepError, planned_identity


# Set while a report is made again from its archive (mea.studies.archive): every run must be in it already, and
# one that is not is an error rather than a training run started behind the reader's back.
ARCHIVE: Path | None = None


def train(run_dir: Path, overrides: list[str]) -> dict:
    """One training run as a subprocess (resumes or skips by itself); its summary."""
    refuse_another_run(run_dir, overrides)
    return train_checked(run_dir, overrides)


def refuse_another_run(run_dir: Path, overrides: list[str]) -> None:
    """Stop where run_dir holds a run of other settings, or, while a report is made from its archive, none at all."""
    if changes := RunDirectory(run_dir).differences(planned_identity(overrides)):
        raise SweepError(f"{run_dir} holds another run than the spec now asks ({describe(changes)}); give the experiment a new `out` or delete that run")
    if ARCHIVE is not None and not (run_dir / "summary.json").is_file():
        raise SweepError(f"{ARCHIVE} has no finished run {run_dir}: it was made from another spec; give the spec the report was made with")


def train_checked(run_dir: Path, overrides: list[str], env: dict[str, str] | None = None) -> dict:
    if not (run_dir / "summary.json").is_file():  # finished or diverged runs are results already
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env)
        if code != 0 and not (run_dir / "summary.json").is_file():
            raise SweepError(f"the run {run_dir} failed (exit {code}); run the experiment again to resume it")
    return json.loads((run_dir / "summary.json").read_text())


def train_side_by_side(runs: dict[Path, list[str]], launcher: Launcher | None = None) -> None:
    """Independent runs trained as the sweep's are on this machine, `jobs` at once of `threads` threads each (as
    train does, each resumes or skips by itself). Every run is checked before any starts (composing a config is
    not thread-safe), and every one is left to finish before the first failure is raised, so that one failed run
    stops none of the others half-way."""
    for run_dir, overrides in runs.items():
        refuse_another_run(run_dir, overrides)
    launcher = launcher or Launcher()
    env = os.environ | launcher.environment()
    with ThreadPoolExecutor(launcher.local_jobs(len(runs))) as pool:
        waiting = [pool.submit(train_checked, run_dir, overrides, env) for run_dir, overrides in runs.items()]
    for finished in waiting:
        finished.result()


def within_noise(delta: float, se: float) -> bool:
    return se > 0 and abs(delta) <= 2 * se


def verdict(delta: float, se: float, better_if_negative: bool = True) -> str:
    if not math.isfinite(delta):
        return "not measured"
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
        return f"{said}; one seed an arm: no interval"
    power = (f"these seeds could see a Δ of {d.smallest_seen:.4f} (80% power); {d.seeds_to_resolve} seeds an arm would resolve this one"
             if within_noise(d.delta, standard_error(a, b)) else f"{d.seeds_to_resolve} seeds an arm resolve it")
    return f"{said}, 95% interval {d.interval[0]:+.4f} to {d.interval[1]:+.4f} (Welch); {power}"
