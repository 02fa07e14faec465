"""What every study is built from, over the library: one training run as a subprocess that resumes or skips by
itself (and refuses a run directory that holds another run), and the noise rule its claims are read with.
A study (mea.studies.*) is a spec plus a little code on top of these, mea.scaling.sweep and the tools."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from mea.run_directory import RunDirectory, describe
from mea.scaling.effects import difference
from mea.scaling.sweep import ROOT, SweepError, planned_identity


# Set while a report is made again from its archive (mea.studies.archive): every run must be in it already, and
# one that is not is an error rather than a training run started behind the reader's back.
ARCHIVE: Path | None = None


def train(run_dir: Path, overrides: list[str]) -> dict:
    """One training run as a subprocess (resumes or skips by itself); its summary."""
    if changes := RunDirectory(run_dir).differences(planned_identity(overrides)):
        raise SweepError(f"{run_dir} holds another run than the spec now asks ({describe(changes)}); give the experiment a new `out` or delete that run")
    if ARCHIVE is not None and not (run_dir / "summary.json").is_file():
        raise SweepError(f"{ARCHIVE} has no finished run {run_dir}: it was made from another spec; give the spec the report was made with")
    if not (run_dir / "summary.json").is_file():  # finished or diverged runs are results already
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT)
        if code != 0 and not (run_dir / "summary.json").is_file():
            raise SweepError(f"the run {run_dir} failed (exit {code}); run the experiment again to resume it")
    return json.loads((run_dir / "summary.json").read_text())


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
