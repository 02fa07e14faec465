"""`mea-sweep` / `sweeps/lr_sweep.py`: run an LR sweep spec through Hydra multirun and collect results.csv.

    mea-sweep sweeps/example.yaml                 # locally, a run per core at once (hydra-joblib-launcher)
    mea-sweep sweeps/example.yaml --jobs 4 --threads 4            # 4 runs at once of 4 threads each
    mea-sweep sweeps/example.yaml --slurm -- hydra.launcher.partition=gpu   # as SLURM job arrays (hydra-submitit-launcher)
    mea-sweep sweeps/example.yaml --collect-only  # only (re)write results.csv
    mea-sweep sweeps/example.yaml --size tiny64   # one size only: sizes side by side in processes of their own

Each (variant, size, lr, seed) run has a fixed directory `<out>/<size>/<variant>/lr<lr>-s<seed>`, so running the
spec again skips what finished (or diverged) and resumes what failed from its checkpoint. A run folder whose
recorded identity (mea.run_directory) differs from what the spec now asks stops the sweep before anything runs,
naming it, and is never collected. SIGTERM or Ctrl-C stops the sweep once the runs in progress have saved.

Under SLURM each run is an array task; submitit's warning before the time limit (USR2, `signal_delay_s`) makes
the trainer save, and submitit then requeues the task, which resumes from that checkpoint (mea.train.StopFlag).
Each array is named `<name>.<out's folder>.<size>.<arm>` and holds only the runs not yet finished: a sweep killed
and started again follows an array still in the queue (`squeue`: that name, its log under the sweep's folder)
instead of submitting it twice.
"""
from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mea.config import ConfigError, batch_plan, compose_config, load_config
from mea.run_directory import RunDirectory, describe, identity_of, write_synced
from mea.runs import metrics_rows
from mea.train.loop import resolve

SLURM_MULTIRUNS = 8  # job arrays in the queue at once under --slurm, unless --jobs says otherwise
ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["variant", "size", "params", "non_embedding_params", "layers", "width", "tokens", "batch_tokens", "lr", "seed",
           "final_train_loss", "final_val_loss", "diverged", "wall_time_s", "run_dir"]


@dataclass
class SweepSize:
    model: str  # a conf/model preset
    tokens: int  # the token budget of each short run at this size
    overrides: list[str] = field(default_factory=list)
    name: str | None = None  # the size's label (default: the preset's name)

    @property
    def label(self) -> str:
        return self.name or self.model


@dataclass
class SweepSpec:
    name: str
    sizes: list[SweepSize]
    lr_min: float
    lr_max: float
    lr_points: int
    variants: list[str] = field(default_factory=list)  # attention variants, each an arm of its own name
    arms: dict[str, list[str]] = field(default_factory=dict)  # or named arms: label -> overrides (diff_nonorm: [attention=diff, attention.norm=false])
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)  # given to every run
    tags: list[str] = field(default_factory=list)  # W&B tags of every run (the runs are grouped under the spec's name)
    out: str = "runs/sweeps/${name}"

    def arm_overrides(self) -> dict[str, list[str]]:
        return dict(self.arms) if self.arms else {v: [f"attention={v}"] for v in self.variants}


class SweepError(ValueError):
    """A spec or sweep that cannot run; one line naming the key or run."""


def load_spec(path: Path) -> SweepSpec:
    if not path.is_file():
        raise SweepError(f"{path} does not exist; give a sweep spec such as sweeps/example.yaml")
    try:
        spec: SweepSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.load(path)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # a key the spec does not have, or text that is not YAML
        raise SweepError(f"{path}: {' '.join(str(e).split())}") from None
    if not spec.arm_overrides():
        raise SweepError(f"{path}: name the variants (variants: [mha, mea]) or the arms (arms: {{label: [overrides]}}) to sweep")
    labels = [size.label for size in spec.sizes]
    if len(set(labels)) < len(labels):
        raise SweepError(f"{path}: two sizes share the label {max(labels, key=labels.count)!r}; give each a distinct name")
    if not 0 < spec.lr_min < spec.lr_max or spec.lr_points < 3:
        raise SweepError(f"{path}: the LR grid needs 0 < lr_min < lr_max and lr_points >= 3 (a quadratic fits the optimum)")
    for size in spec.sizes:
        if size.tokens <= 0:
            raise SweepError(f"{path}: size {size.label} has tokens={size.tokens}; give each size a positive token budget")
    return spec


def lr_grid(spec: SweepSpec) -> list[float]:
    return [float(f"{lr:.3g}") for lr in np.geomspace(spec.lr_min, spec.lr_max, spec.lr_points)]


def compose_run(overrides: list[str]):
    try:
        return compose_config(overrides)
    except ConfigError as e:
        raise SweepError(str(e)) from None


def shared_overrides(spec: SweepSpec, size: SweepSize, arm: str, arm_overrides: list[str]) -> list[str]:
    """What every run of one size and arm is given besides its LR and seed, with the step count that spends the
    token budget."""
    base = [f"model={size.model}", *spec.overrides, *size.overrides, f"model.name={size.label}", *arm_overrides, f"arm={arm}"]
    cfg = compose_run(base)
    steps = max(1, math.ceil(size.tokens / batch_plan(cfg).tokens_per_step))
    tags = [f"logger.tags=[{','.join(spec.tags)}]"] if spec.tags else []
    return [*base, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"logger.group={spec.name}", *tags]


RUN_FOLDER = "{arm}/lr{lr}-s{seed}"  # under the size's folder: Hydra's sweep subdir, and where `finished` looks


@dataclass
class Launcher:
    """Where a sweep's runs go: SLURM job arrays, or this machine, `jobs` runs at once of `threads` threads each
    (by default one thread a run and a run per core: small runs side by side make more steps per second in all
    than one run on every core). Under SLURM `jobs` is how many multiruns (job arrays) are in the queue at once."""

    slurm: bool = False
    jobs: int | None = None
    threads: int = 1
    overrides: list[str] = field(default_factory=list)  # hydra.launcher.* settings: partition, account, mem_gb, ...
    poll_s: float = 30.0  # under SLURM: how often an array an earlier sweep submitted is looked for in the queue

    def local_jobs(self, runs: int) -> int:
        jobs = self.jobs or int(os.environ.get("MEA_SWEEP_JOBS", 0)) or len(os.sched_getaffinity(0)) // self.threads
        return max(1, min(runs, jobs))

    def side_by_side(self, multiruns: int, runs: int) -> int:
        """How many multiruns go at once. Under SLURM several, since each only waits on its array (each waiting
        process holds ~0.25 GB on the login node, hence a cap). Locally as many as there are runs at once, each
        training its runs in turn: then no core waits while a multirun trains its last run alone (5 runs at 2 at a
        time leave a core idle a third of the time)."""
        at_once = (self.jobs or SLURM_MULTIRUNS) if self.slurm else self.local_jobs(multiruns * runs)
        return max(1, min(multiruns, at_once))

    def hydra_overrides(self, runs: int, side_by_side: int = 1) -> list[str]:
        jobs = max(1, self.local_jobs(runs * side_by_side) // side_by_side)
        chosen = ["hydra/launcher=slurm"] if self.slurm else ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={min(runs, jobs)}"]
        return [*chosen, *self.overrides]

    def environment(self) -> dict[str, str]:
        return {} if self.slurm else {"OMP_NUM_THREADS": str(self.threads)}


def multirun_command(spec: SweepSpec, size: SweepSize, arm: str, shared: list[str], out: Path, launcher: Launcher, side_by_side: int = 1,
                     lrs: list[float] | None = None) -> list[str]:
    """One Hydra multirun per size and arm: LRs (every LR of the grid unless given) × seeds, side_by_side of them at
    once; under SLURM one job array, named array_name."""
    return [
        sys.executable, str(ROOT / "train.py"), "--multirun",
        f"optim.lr={','.join(map(str, lrs or lr_grid(spec)))}",
        f"trainer.seed={','.join(map(str, spec.seeds))}",
        *shared,
        f"hydra.sweep.dir={out / size.label}",
        f"hydra.sweep.subdir={RUN_FOLDER.format(arm=arm, lr='${optim.lr}', seed='${trainer.seed}')}",
        *launcher.hydra_overrides(runs_per_multirun(spec), side_by_side),
        *([f"hydra.launcher.name={array_name(spec, size, arm)}"] if launcher.slurm else []),
    ]


def array_name(spec: SweepSpec, size: SweepSize, arm: str) -> str:
    """The SLURM job name of one multirun's array: how a sweep started again finds it in the queue."""
    return f"{spec.name}.{Path(spec.out).name}.{size.label}.{arm}"


def queued(names: set[str], under: Path) -> set[str]:
    """Those of `names` that a job of this user in the SLURM queue (pending, running, requeued or completing) bears
    and that logs under `under`, the sitting's or the sweep's folder: a job of the same name logging elsewhere
    (another sitting's of the same name) is not one of ours."""
    if not names:
        return set()
    proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-O", "Name:512,StdOut:4096"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"squeue failed ({(proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}): the driver cannot tell which runs are queued; "
                         "run it where SLURM's commands answer (a login node)")
    jobs, folder = [line.strip().split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip()], under.resolve()
    return {job[0] for job in jobs if job[0] in names and len(job) == 2 and Path(job[1].strip()).is_relative_to(folder)}


def wait_until_gone(names: set[str], under: Path, poll_s: float) -> None:
    """Until no job of ours (queued) bearing one of these names is left in the queue."""
    while queued(names, under):
        time.sleep(poll_s)


def runs_per_multirun(spec: SweepSpec) -> int:
    return len(lr_grid(spec)) * len(spec.seeds)


def planned_identity(overrides: list[str]) -> dict:
    """The identity train.py will record for these overrides, as far as it is known before the run starts: the
    corpus's key is left to train.py, and an automatic precision to the machine that trains."""
    cfg = OmegaConf.to_object(compose_run(overrides))
    identity = identity_of(resolve(cfg, torch.device("cpu")))
    if cfg.trainer.precision == "auto":
        del identity["trainer.precision"]
    return identity


def planned_runs(spec: SweepSpec, size: SweepSize, arm: str, shared: list[str], out: Path) -> dict[RunDirectory, dict]:
    """Each run of one multirun (LRs × seeds) and the identity it must hold."""
    base = planned_identity(shared)
    return {RunDirectory(out / size.label / RUN_FOLDER.format(arm=arm, lr=lr, seed=seed)): base | {"optim.lr": lr, "trainer.seed": seed}
            for lr in lr_grid(spec) for seed in spec.seeds}


def sweep_runs(spec: SweepSpec) -> dict[Path, list[str]]:
    """Every run of the spec: its folder and the overrides its multirun gives it."""
    out, runs = Path(spec.out), {}
    for size in spec.sizes:
        for arm, overrides in spec.arm_overrides().items():
            shared = shared_overrides(spec, size, arm, overrides)
            runs |= {out / size.label / RUN_FOLDER.format(arm=arm, lr=lr, seed=seed): [*shared, f"optim.lr={lr}", f"trainer.seed={seed}"]
                     for lr in lr_grid(spec) for seed in spec.seeds}
    return runs


def refuse_foreign_runs(plans: dict[RunDirectory, dict], out: Path) -> None:
    """Stop, naming them, where runs of the spec's folders hold another identity (the spec changed under them)."""
    foreign = {run: changes for run, identity in plans.items() if (changes := run.differences(identity))}
    if foreign:
        run, changes = next(iter(foreign.items()))
        raise SweepError(f"{len(foreign)} run(s) under {out} hold another identity than the spec asks (first: {run.path}, {describe(changes)}); "
                         "give the spec a new `out`, or delete those runs")


def smoothed_final_loss(run_dir: Path, share: float = 0.1) -> float:
    """Mean training loss over the last `share` of the logged rows (at least one): less noisy than the last row."""
    losses = [r["loss"] for r in metrics_rows(run_dir)]
    tail = losses[-max(1, round(len(losses) * share)) :]
    return float(np.mean(tail)) if tail else math.nan


def result_row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    loss = smoothed_final_loss(run_dir)
    first = metrics_rows(run_dir)[0]["loss"]
    diverged = bool(summary.get("diverged")) or not math.isfinite(loss) or loss > first  # no better than at the start
    return {
        "variant": cfg.label, "size": cfg.model.name, "params": summary["params"], "non_embedding_params": summary["non_embedding_params"],
        "layers": cfg.model.n_layers, "width": cfg.model.dim, "tokens": summary["tokens"], "batch_tokens": cfg.trainer.global_batch * cfg.data.seq_len,
        "lr": cfg.optim.lr, "seed": cfg.trainer.seed, "final_train_loss": loss, "final_val_loss": summary["final_val_loss"], "diverged": diverged,
        "wall_time_s": summary["wall_time_s"], "run_dir": str(run_dir),
    }


def collect(out: Path, plans: dict[RunDirectory, dict]) -> Path:
    """results.csv from the spec's finished runs that hold the identity it asks, written atomically."""
    rows = [result_row(run.path) for run, identity in sorted(plans.items(), key=lambda item: item[0].path) if run.holds(identity)]
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_synced(out / "results.csv", table.getvalue())  # its temporary name is the process's own: sizes run side by side (--size) collect at once
    return out / "results.csv"


def read_results(*paths: Path) -> list[dict]:
    """The rows of results.csv files as `collect` writes them (every value a string)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def not_diverged(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["diverged"] != "True"]


def at_largest_size(rows: list[dict]) -> list[dict]:
    """The rows of the largest size, picked by non-embedding parameters (the arms of one size differ by a few)."""
    largest = max(rows, key=lambda r: float(r["non_embedding_params"]))["size"]
    return [r for r in rows if r["size"] == largest]


def best_by_arm(rows: list[dict]) -> dict[str, dict]:
    """Each arm's row of lowest final train loss."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["variant"] not in best or float(r["final_train_loss"]) < float(best[r["variant"]]["final_train_loss"]):
            best[r["variant"]] = r
    return best


class SweepStopped(SweepError):
    """A stop signal ended the sweep after the run in progress saved; the same command resumes it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after the run in progress saved; the same command resumes the sweep")
        self.signum = signum


def run_side_by_side(commands: list[list[str]], env: dict[str, str], at_once: int = 1) -> tuple[list[int | None], int | None]:
    """Each command's exit code (None where it never started), at_once of them running at a time, and the stop
    signal if one came. Each multirun runs in a session of its own, so that a stop (SIGTERM, or Ctrl-C at the
    terminal) reaches each of its processes (its runs, whichever launcher started them) once, as SIGTERM: they save
    a checkpoint, and no further command starts. The stop returns only once every process of those sessions has
    ended."""
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    stopped = None

    def stop(signum, frame):
        nonlocal stopped
        stopped = signum
        for child in list(running.values()):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        waiting = list(enumerate(commands))
        while running or (waiting and stopped is None):
            while waiting and stopped is None and len(running) < at_once:
                i, command = waiting.pop(0)
                running[i] = subprocess.Popen(command, cwd=ROOT, start_new_session=True, env={**os.environ, **env})
                keep_niceness(running[i].pid)
                if stopped is not None:  # the stop came while it started
                    os.killpg(running[i].pid, signal.SIGTERM)
            for i, child in list(running.items()):
                if child.poll() is not None:
                    codes[i] = child.returncode
                    wait_for_session(child.pid)
                    del running[i]
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return codes, stopped


def keep_niceness(session: int) -> None:
    """Give a session we started our own nice value. Linux schedules each session as an autogroup of its own, at
    nice 0 whatever its processes' own nice, so without this `nice mea-sweep` runs its multiruns at the priority
    of the user's other work."""
    if (niceness := os.nice(0)) > 0:
        try:
            Path(f"/proc/{session}/autogroup").write_text(str(niceness))
        except OSError:
            pass  # a kernel without autogroups, or not Linux: the processes' own nice value is all there is


def wait_for_session(session: int, timeout: float = 600) -> None:
    """Until no process of the session is left (a launcher's workers may outlive it while they save)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(in_session(p, session) for p in psutil.process_iter()):
        time.sleep(0.2)


def in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.Error):
        return False


def run_sweep(spec: SweepSpec, launcher: Launcher | None = None, collect_only: bool = False, dry_run: bool = False, only_sizes: list[str] | None = None) -> Path | None:
    """Run (or resume) every multirun of the spec (of the sizes named in only_sizes, if given), then write
    results.csv from the spec's finished runs; returns its path (None for a dry run)."""
    out, launcher = Path(spec.out), launcher or Launcher()
    labels = [size.label for size in spec.sizes]
    if unknown := sorted(set(only_sizes or []) - set(labels)):
        raise SweepError(f"--size {' '.join(unknown)}: the spec has no such size; its sizes are {', '.join(labels)}")
    jobs = [(size, arm, shared_overrides(spec, size, arm, overrides)) for size in spec.sizes for arm, overrides in spec.arm_overrides().items()]
    plans = {(size.label, arm): planned_runs(spec, size, arm, shared, out) for size, arm, shared in jobs}
    jobs = [job for job in jobs if not only_sizes or job[0].label in only_sizes]
    if dry_run:
        side_by_side = launcher.side_by_side(len(jobs), runs_per_multirun(spec))
        for size, arm, shared in jobs:
            print(" ".join(multirun_command(spec, size, arm, shared, out, launcher, side_by_side)))
        return None
    every_run = {run: identity for runs in plans.values() for run, identity in runs.items()}
    refuse_foreign_runs(every_run, out)
    failed, stopped = [], None
    if not collect_only:
        to_run, followed = unfinished_multiruns(spec, jobs, plans, launcher)
        side_by_side = launcher.side_by_side(len(to_run), runs_per_multirun(spec))
        commands = [multirun_command(spec, size, arm, shared, out, launcher, side_by_side, lrs) for size, arm, shared, lrs in to_run]
        codes, stopped = run_side_by_side(commands, launcher.environment(), side_by_side)
        failed = [f"{size.label}/{arm}" for (size, arm, _, _), code in zip(to_run, codes) if code not in (0, None)]
        if stopped is None:
            wait_until_gone(set(followed.values()), out, launcher.poll_s)
            failed += [f"{label}/{arm}" for label, arm in followed if not all(run.holds(identity) for run, identity in plans[label, arm].items())]
    results = collect(out, every_run)
    print(f"wrote {results} ({sum(1 for _ in open(results)) - 1} runs)")
    if stopped is not None:
        raise SweepStopped(stopped)
    if failed:
        raise SweepError(f"the multiruns of {', '.join(failed)} failed; run the same command again to resume them")
    return results


def unfinished_multiruns(spec: SweepSpec, jobs: list[tuple], plans: dict, launcher: Launcher) -> tuple[list[tuple], dict[tuple, str]]:
    """The multiruns to start, each with the LRs that still have a run to finish; under SLURM, apart, those whose
    array is still in the queue (an earlier sweep's, followed rather than submitted twice), by their array's name."""
    to_run, followed = [], {}
    in_queue = queued({array_name(spec, size, arm) for size, arm, _ in jobs}, Path(spec.out)) if launcher.slurm else set()
    for size, arm, shared in jobs:
        unfinished = {identity["optim.lr"] for run, identity in plans[size.label, arm].items() if not run.holds(identity)}
        if not unfinished:
            print(f"{size.label}/{arm}: every run is already done")
        elif (name := array_name(spec, size, arm)) in in_queue:
            print(f"{size.label}/{arm}: its array {name} is in the queue; followed, not submitted again", flush=True)
            followed[size.label, arm] = name
        else:
            to_run.append((size, arm, shared, [lr for lr in lr_grid(spec) if lr in unfinished]))
    return to_run, followed


def launcher_settings(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, the hydra.launcher.* settings after `--`), refusing anything else there."""
    argv, settings = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if foreign := [o for o in settings if not o.startswith("hydra.launcher.")]:
        raise SweepError(f"{foreign[0]}: after -- only hydra.launcher.* settings go; put what the runs train with in the spec's overrides")
    return argv, settings


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mea-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--slurm", action="store_true", help="fan each size out as SLURM job arrays")
    parser.add_argument("--jobs", type=int, help="locally: runs at once (default: $MEA_SWEEP_JOBS, else the cores over --threads); under --slurm: job arrays in the queue at once (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="locally: threads of each run (default 1)")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the multirun commands")
    parser.add_argument("--size", action="append", help="run only this size of the spec (repeatable): one process or machine per size")
    parser.epilog = "After --, hydra.launcher.KEY=VALUE settings for the launcher (partition, account, timeout_min, ...)."
    try:
        argv, launcher_overrides = launcher_settings(argv)
        args = parser.parse_args(argv)
        if (args.jobs is not None and args.jobs < 1) or args.threads < 1:
            raise SweepError("--jobs and --threads must be at least 1")
        launcher = Launcher(args.slurm, args.jobs, args.threads, launcher_overrides)
        run_sweep(load_spec(args.spec), launcher, args.collect_only, args.dry_run, args.size)
    except SweepStopped as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
