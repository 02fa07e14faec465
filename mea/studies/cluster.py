"""`mea-experiment SPEC --slurm`: a sitting's runs as SLURM jobs, submitted and followed from the login node.

    mea-experiment sweeps/paper_gpu_small.yaml --slurm -- hydra.launcher.partition=gpu hydra.launcher.account=proj hydra.launcher.timeout_min=1440

The experiment is the same code as on one machine; SlurmRuns takes LocalRuns' place, so only where a run trains
changes. The experiment asks for each stage's runs once the stages it needs are done, and SlurmRuns sends them:
- the sweep and the stability probe, one GPU a run, as job arrays (hydra-submitit-launcher, as `mea-sweep
  --slurm` does), each named `<name>.<sweep|stability>.<size>.<arm>`;
- every other run (and a sweep's, where its stage asks for several GPUs) as a job of `mea-launch slurm` on the
  nodes its stage's `resources` ask for, named `<name>.<its folder under the run folder, dots for slashes>`;
- first, each corpus the runs read, tokenised once by a prepare job (`mea-prepare`) into data.cache_dir, which
  must be storage the nodes share; no run is submitted before its corpus is in the cache.
How a run's job is found: by its name, in `squeue`, with its log under the sitting's folder. So a driver killed and started again follows what is queued
or running, skips what is finished (its summary.json), and submits only the rest. A requeued or preempted job
resumes its run from its checkpoint, by mea-launch's script or submitit's requeue. SLURM is the scheduler: this
only submits, follows and reads.

The settings after `--` are hydra.launcher.* as for `mea-sweep --slurm`. The arrays take them all; the jobs take
partition, account, qos, constraint, timeout_min, cpus_per_task and signal_delay_s, and gpus_per_node=0 (nodes
without GPUs: each rank a CPU process, as on launch/local_slurm.sh's cluster).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from mea.data.shards import corpus_path
from mea.scaling.sweep import Launcher, SweepError, SweepSpec, compose_run, queued, run_sweep, sweep_runs, wait_until_gone
from mea.studies.plan import Rates, plan
from mea.studies.protocol import LocalRuns
from mea.tools.launch import ROOT, LaunchError, find_tool, launch, submit

JOB_SETTINGS = {"partition": "--partition", "account": "--account", "qos": "--qos", "constraint": "--constraint", "timeout_min": "--time",
                "cpus_per_task": "--cpus-per-task", "signal_delay_s": "--signal-seconds"}  # hydra.launcher.<key> -> mea-launch's flag


READ_DATA = ("data", "+experiment=", "trainer.init_from=")  # the overrides a run's corpus follows (a recovery reads its model's tokenizer)


def stage_of(overrides: list[str]) -> str:
    """A run's stage, from the W&B tag every run of a sitting carries (logger.tags=[stage:<stage>])."""
    tags = next((o for o in overrides if o.startswith("logger.tags=")), "")
    return next((tag.removeprefix("stage:") for tag in tags.removeprefix("logger.tags=").strip("[]").split(",") if tag.startswith("stage:")), "target")


class SlurmRuns(LocalRuns):
    """A sitting's runs as SLURM jobs (this module's docstring): LocalRuns' interface, each run a job or an array task."""

    def __init__(self, name: str, out: Path, resources_of: Callable, settings: list[str], poll_s: float = 30.0):
        super().__init__(launcher=Launcher(slurm=True, overrides=settings, poll_s=poll_s))
        self.name, self.out, self.resources_of = name, out, resources_of
        self.settings = dict(s.removeprefix("hydra.launcher.").split("=", 1) for s in settings)
        self.prepared: set[Path] = set()

    @property
    def on_cpus(self) -> bool:
        return self.settings.get("gpus_per_node") == "0"

    def flags(self, keys=tuple(JOB_SETTINGS)) -> list[str]:
        """`--flag=value` for those of the launcher settings given that are among keys (JOB_SETTINGS' names)."""
        return [f"{JOB_SETTINGS[key]}={self.settings[key]}" for key in keys if key in self.settings]

    def job_flags(self) -> list[str]:
        """mea-launch's flags for the launcher settings given."""
        return self.flags() + (["--env", "DS_ACCELERATOR=cpu"] if self.on_cpus else [])

    def check_shapes(self, stages: dict[str, dict[Path, list[str]]]) -> None:
        """Before anything is submitted: each stage's batch split over its runs' ranks (the plan's check), and its
        shape asked of SLURM (`sbatch --test-only`): a shape the cluster refuses stops here with SLURM's reason."""
        plan(stages, self.resources_of, Rates({}, 1.0, "the batch check alone"))
        sbatch = find_tool("sbatch") or "sbatch"
        for stage in [stage for stage, runs in stages.items() if runs]:
            given = self.resources_of(stage)
            gpus = [] if self.on_cpus else [f"--gpus-per-node={given.gpus_per_node}"]
            flags = self.flags([key for key in JOB_SETTINGS if key != "signal_delay_s"])  # sbatch's own flags
            asked = subprocess.run([sbatch, "--test-only", f"--nodes={given.nodes}", "--ntasks-per-node=1", *gpus, *flags, "--wrap", "true"],
                                   capture_output=True, text=True)
            if asked.returncode != 0:
                said = [line.removeprefix("sbatch: error: ") for line in asked.stderr.splitlines() if line.strip()]
                raise SweepError(f"resources.{stage}: SLURM refuses {given.nodes} node(s) × {given.gpus_per_node} GPU(s) a run: "
                                 f"{said[-1] if said else f'exit {asked.returncode}'}; change the stage's resources or the launcher settings")

    def sweep(self, spec: SweepSpec) -> Path:
        runs = sweep_runs(spec)
        self.prepare(runs.values())
        if self.resources_of(stage_of(next(iter(runs.values())))).gpus == 1:
            return run_sweep(spec, self.launcher)
        self.side_by_side(runs)
        return run_sweep(spec, collect_only=True)

    def start(self, runs: dict[Path, list[str]], env: dict[str, str], at_once: int) -> None:
        """Every run checked, then each one neither finished nor in the queue submitted, and all followed until
        they leave the queue; a run that left it unfinished is named."""
        for run_dir, overrides in runs.items():
            self.refuse_another_run(run_dir, overrides)
        waiting = {run_dir: overrides for run_dir, overrides in runs.items() if not (run_dir / "summary.json").is_file()}
        if not waiting:
            return
        self.prepare(waiting.values())
        names = {run_dir: self.job_name(run_dir) for run_dir in waiting}
        in_queue = queued(set(names.values()), self.out)
        for run_dir, overrides in waiting.items():
            if names[run_dir] in in_queue:
                print(f"{run_dir}: its job {names[run_dir]} is in the queue; followed, not submitted again", flush=True)
            else:
                self.submit(run_dir, overrides)
        wait_until_gone(set(names.values()), self.out, self.launcher.poll_s)
        if unfinished := [run_dir for run_dir in waiting if not (run_dir / "summary.json").is_file()]:
            raise SweepError(f"{len(unfinished)} run(s) left the queue unfinished (first: {unfinished[0]}; its log in {unfinished[0] / 'logs'}/); "
                             "run the same command again to resume them")

    def job_name(self, run_dir: Path) -> str:
        return f"{self.name}." + ".".join(run_dir.relative_to(self.out).parts)

    def submit(self, run_dir: Path, overrides: list[str]) -> None:
        given = self.resources_of(stage_of(overrides))
        engine = [f"deepspeed={given.deepspeed}"] if given.deepspeed != "none" else []
        try:
            launch(["slurm", "--nodes", str(given.nodes), "--procs-per-node", str(given.gpus_per_node), "--run-dir", str(run_dir),
                    "--job-name", self.job_name(run_dir), *self.job_flags(), "--", *overrides, *engine])
        except LaunchError as e:
            raise SweepError(f"{run_dir}: {e}") from None

    def prepare(self, runs) -> None:
        """Each corpus these runs read that is not yet in the cache, tokenised by one prepare job (a CPU job of its
        own, followed until it ends) before any of them is submitted."""
        corpora: dict[Path, list[str]] = {}
        for overrides in runs:
            data = [o for o in overrides if o.startswith(READ_DATA)]
            if data not in corpora.values():
                corpora.setdefault(corpus_path(OmegaConf.to_object(compose_run(data).data)), data)
        todo = {path: data for path, data in corpora.items() if path not in self.prepared and not (path / "manifest.json").is_file()}
        names = {path: f"{self.name}.prepare.{path.name}" for path in todo}
        in_queue = queued(set(names.values()), self.out)
        for path, data in todo.items():
            if names[path] not in in_queue:
                self.submit_prepare(path, data, names[path])
        wait_until_gone(set(names.values()), self.out, self.launcher.poll_s)
        if missing := [path for path in todo if not (path / "manifest.json").is_file()]:
            raise SweepError(f"the prepare job of {missing[0].name} ended without its corpus; see {self.out / 'prepare' / missing[0].name / 'logs'}/")
        self.prepared |= set(corpora)

    def submit_prepare(self, path: Path, data: list[str], name: str) -> None:
        folder = self.out / "prepare" / path.name
        for made in ("logs", "launch"):
            (folder / made).mkdir(parents=True, exist_ok=True)
        flags = [f"#SBATCH {flag}\n" for flag in self.flags(("partition", "account", "qos", "timeout_min"))]
        script = (f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --nodes=1\n#SBATCH --cpus-per-task={self.settings.get('cpus_per_task', 8)}\n"
                  f"#SBATCH --output={folder}/logs/%x-%j.out\n#SBATCH --error={folder}/logs/%x-%j.err\n" + "".join(flags)
                  + f"cd {shlex.quote(str(ROOT))}\nexec {shlex.join([sys.executable, str(ROOT / 'data' / 'prepare.py'), *data])}\n")
        try:
            submit(find_tool("sbatch") or "sbatch", script, folder / "launch", wait=False)
        except LaunchError as e:
            raise SweepError(f"the prepare job of {path.name}: {e}") from None
