"""`make gpu-check` (`mea-gpu-check`): does this GPU node run mea correctly, and how fast, in one table.

    make gpu-check                       # or: python -m mea.tools.gpu_check [--out FILE]

    python -m mea.tools.gpu_check --budget 480   # what fits 8 minutes, in the order below; the rest named as not reached

1. the CUDA suite (`pytest -m cuda`): each test passes, fails or skips;
2. bench/decode.py; bench/train_step.py with every row eager, then the five variants compiled (`--compile on --arms
   mha_gn,mea,diff,tha`), each table side by side in one run; and mha at model=125m under each loss form (`--preset
   125m --losses`, eager), with --device cuda (presets that fit an 80 GB card), their tables quoted. The compiled
   half is its own step: its compilations come before its first timed round, so a budget that ended among them would
   lose every table of a step that held the eager rows too;
3. a short trainer run of each variant under each engine (plain PyTorch, ZeRO 1, 2, 3) at model=125m, T 1024,
   batch 16, in bf16, eager: tokens/s and MFU over its last 10 steps, and peak memory. Every variant runs under
   one engine before the next engine starts, so a budget that ends midway has compared the variants.

The table goes to stdout and to runs/gpu-check/<card>-<date>.md, which BENCHMARKS.md quotes; beside it, the
trainer runs' throughput as data (<card>-<date>.json), which `mea-experiment SPEC --plan --throughput` costs a sitting at.
Both are written again as each step ends, so a check stopped from outside (a lease, a job's time limit) leaves what
it measured. With --budget, a step still running when the budget ends is interrupted (SIGINT: pytest reports the
tests it ran, the training-step bench the rounds that had ended, a trainer run saves) and the steps after it are
listed as not reached. Where the project's dependencies are missing (a bare GPU image), or no GPU is visible, it
says so in one line and exits 1.
Imports the standard library alone until those checks pass.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Import names of what train.py, the benchmarks and the CUDA suite import: pytest imports every test file to collect
# the CUDA tests, so one module it cannot import (lm_eval, in tests/test_eval.py) would stop the whole suite.
NEEDED = ("torch", "hydra", "omegaconf", "deepspeed", "datasets", "tokenizers", "wandb", "safetensors", "xxhash", "filelock", "psutil", "scipy", "numpy",
          "matplotlib", "packaging", "tqdm", "yaml", "lm_eval", "pytest", "xdist", "pytest_timeout")
VARIANTS = ("mha", "mha_gn", "mea", "diff", "tha")
ENGINES = ("none", "zero1", "zero2", "zero3")
BENCHES = (("bench/decode.py", "--device", "cuda"),
           ("bench/train_step.py", "--device", "cuda", "--rounds", "2", "--compile", "off"),
           ("bench/train_step.py", "--device", "cuda", "--rounds", "2", "--compile", "on", "--arms", "mha_gn,mea,diff,tha"),  # 5 compilations, not the 8 of every row
           ("bench/train_step.py", "--device", "cuda", "--preset", "125m", "--losses", "--rounds", "3", "--compile", "off"))  # the LM head's loss, where it is largest
TRAINER_RUN = ("model=125m", "data.seq_len=1024", "trainer.global_batch=16", "trainer.max_steps=20", "trainer.log_every=10", "trainer.eval_every=20",
               "trainer.eval_batches=1", "trainer.dynamics=false", "trainer.sample_tokens=8", "trainer.device=cuda", "trainer.precision=bf16",
               "trainer.compile=false", "logger.mode=disabled")  # eager: 20 compilations would not fit 5 minutes
STEP_TIMEOUT_S = 1800  # a step's limit without --budget: one that hangs (a collective waiting forever) is named, not waited on
GRACE_S = 30  # after SIGINT at the budget's end, before the step is killed: pytest's report, a trainer's checkpoint


def refusal() -> str | None:
    """Why this machine cannot run the check, in one line; None when it can."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return (f"gpu-check: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed for {sys.executable}; "
                "install the project into the environment that has the CUDA torch (`pip install -e '.[test]'`, see README)")
    import torch

    if not torch.cuda.is_available():
        return f"gpu-check: no CUDA GPU is visible to torch {torch.__version__} here (torch.cuda.is_available() is False); run it on a GPU node"
    return None


def timed(command: list[str], timeout: float | None, grace: float = GRACE_S) -> tuple[subprocess.CompletedProcess, float]:
    """Run command from the repository's root; past timeout (what is left of --budget; None: a step's own limit)
    it gets SIGINT, so that it can say what it did, and past the grace after that it is killed. Its exit status is
    then 124, and its stderr ends with the time."""
    timeout = STEP_TIMEOUT_S if timeout is None else timeout
    start = time.perf_counter()
    with interruptible(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                stdout, stderr = proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            said = stderr.rstrip("\n") + "\n" if stderr.strip() else ""
            return subprocess.CompletedProcess(command, 124, stdout, f"{said}stopped after {timeout:.0f} s"), time.perf_counter() - start
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), time.perf_counter() - start


def interruptible(command: list[str], **popen) -> subprocess.Popen:
    """command's process, from the repository's root, with SIGINT's default even where this one ignores it: a
    shell's background job does (`make gpu-check &`, `make test &` in a script), an ignored signal stays ignored
    across exec, and Python then never raises KeyboardInterrupt, so a step could not say what it did. A handler,
    unlike SIG_IGN, is reset by exec."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, cwd=ROOT, **popen)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_result(proc: subprocess.CompletedProcess, budget: float | None) -> str:
    """A step's result: stopped at the budget's end is not a failure (it is what did not fit); past its own limit it is."""
    return "pass" if proc.returncode == 0 else "skip" if proc.returncode == 124 and budget is not None else "fail"


def last_said(proc: subprocess.CompletedProcess) -> str:
    """What a step that did not pass said last (its error, or when it was stopped), one table cell long."""
    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The last line a step printed, its stdout's then its stderr's: a step stopped mid-line (pytest's progress dots)
    leaves its stdout without the newline, and the stop's own words are a line of their own."""
    printed = f"{proc.stdout.rstrip()}\n{proc.stderr}".strip()
    return printed.splitlines()[-1] if printed else f"exit {proc.returncode}"


def bench_step(command: list[str], budget: float | None = None) -> tuple[tuple[str, str, str], str]:
    """A benchmark's check, and what it printed quoted: its tables; where it did not pass, what it printed before it
    stopped (a training-step bench stopped at the budget's end prints the rounds that had ended) and its error."""
    name = " ".join(command)
    proc, seconds = timed([sys.executable, *command], timeout=budget)
    printed = proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr[-3000:]
    return (name, step_result(proc, budget), f"{seconds:.0f} s" if proc.returncode == 0 else last_said(proc)), f"`python {name}`\n```\n{printed.rstrip()}\n```"


def cuda_suite(folder: Path, budget: float | None = None) -> tuple[list[tuple[str, str, str]], float]:
    """(check, result, detail) of every test `pytest -m cuda` collects, from its JUnit report (of the tests that
    ran, where the budget's end stopped the suite). budget: the seconds left of --budget; None for none."""
    report = folder / "cuda-suite.xml"
    workers = min(8, os.cpu_count() or 1)
    proc, seconds = timed([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-n", str(workers), "--dist", "loadgroup",
                           f"--junitxml={report}"], timeout=budget)
    checks = []
    for case in ET.parse(report).iter("testcase") if report.is_file() else ():  # no report: stopped before pytest wrote one, or it failed to start
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        verdict = {None: "pass", "failure": "fail", "error": "fail", "skipped": "skip"}[outcome.tag if outcome is not None else None]
        detail = (outcome.get("message") or "").splitlines()[0][:160] if outcome is not None and outcome.get("message") else ""
        checks.append((f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", verdict, detail))
    said = last_line(proc)
    if proc.returncode == 124:
        checks.append(("CUDA suite", step_result(proc, budget), f"{said}: the tests not listed above did not run"))
    elif not report.is_file():
        checks.append(("CUDA suite", "fail", said))
    return checks, seconds


def trainer_table(folder: Path, overrides=TRAINER_RUN, variants=VARIANTS, engines=ENGINES,
                  budget: float | None = None) -> tuple[list[tuple[str, str, str]], list[str], list[dict], float]:
    """Every variant under every engine, one Hydra multirun (one process), engine by engine: a check each, the
    table's rows, and the throughput rows that `mea-experiment --plan` costs a sitting at."""
    sweep = folder / "trainer"
    fixed = ",".join(o.split("=")[0] for o in overrides)  # each run's folder is named by its variant and engine alone
    steps = int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=")[1])
    proc, seconds = timed([sys.executable, "train.py", "-m", *overrides, f"deepspeed={','.join(engines)}", f"attention={','.join(variants)}", f"hydra.sweep.dir={sweep}",
                           "hydra.sweep.subdir=${hydra.job.override_dirname}", f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]"], timeout=budget)
    checks, rows, throughput = [], ["| variant | engine | tokens/s | MFU | peak GiB | final loss |", "|---|---|---:|---:|---:|---:|"], []
    for variant in variants:
        for engine in engines:
            metrics = sweep / f"attention={variant},deepspeed={engine}" / "metrics.jsonl"
            last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() and metrics.read_text().strip() else None
            if last is None or last["step"] != steps:  # a run that failed stops the multirun: the runs after it say why too
                checks.append((f"trainer {variant} · {engine}", step_result(proc, budget), last_said(proc)))
                continue
            mfu = last.get("mfu", math.nan)  # NaN where mea does not know the card's peak (trainer.peak_tflops)
            memory = last.get("peak_memory_gib", math.nan)
            checks.append((f"trainer {variant} · {engine}", "pass", f"{last['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.3f}, {memory:.1f} GiB"))
            rows.append(f"| {variant} | {engine} | {last['tokens_per_s']:,.0f} | {mfu:.3f} | {memory:.1f} | {last['loss']:.3f} |")
            summary = json.loads((metrics.parent / "summary.json").read_text())
            throughput.append({"variant": variant, "engine": engine, "model": summary["model"], "seq_len": seq_len(overrides), "gpus": summary["world_size"],
                               "tokens_per_s": last["tokens_per_s"], "flops_per_token": summary["flops_per_token"], "mfu": mfu})
    return checks, rows, throughput, seconds


def seq_len(overrides) -> int:
    return int(next(o for o in overrides if o.startswith("data.seq_len=")).split("=")[1])


class Report:
    """The table as it grows, written whole (table and throughput data) after every step of the check."""

    def __init__(self, out: Path, card: str, budget: float | None):
        import torch

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown"
        today = datetime.date.today().isoformat()
        self.out, self.budget = out, budget
        self.title = f"# gpu-check: {card} · torch {torch.__version__} (CUDA {torch.version.cuda}) · {today} · commit {commit}"
        self.data = {"card": card, "date": today, "commit": commit, "torch": torch.__version__, "rows": []}
        self.started = time.perf_counter()
        self.checks, self.times, self.trainer_rows, self.quoted = [], [], [], []

    def left(self) -> float | None:
        """Seconds left of the budget; None without one."""
        return None if self.budget is None else self.budget - (time.perf_counter() - self.started)

    def text(self) -> str:
        count = {verdict: sum(result == verdict for _, result, _ in self.checks) for verdict in ("pass", "fail", "skip")}
        budget = "" if self.budget is None else f", budget {self.budget:.0f} s"
        return "\n".join([self.title, "", f"{len(self.checks)} checks: {count['pass']} pass, {count['fail']} fail, {count['skip']} skipped, "
                                          f"in {time.perf_counter() - self.started:.0f} s ({', '.join(self.times)}{budget})", "",
                          "| check | result | detail |", "|---|---|---|", *(f"| {name} | {result} | {detail.replace('|', '/')} |" for name, result, detail in self.checks), "",
                          "Trainer runs (" + " ".join(TRAINER_RUN) + "):", "", *self.trainer_rows, "", *self.quoted]) + "\n"

    def write(self) -> None:
        from mea.run_directory import write_synced

        write_synced(self.out, self.text())
        write_synced(self.out.with_suffix(".json"), json.dumps(self.data, indent=1))

    @property
    def failed(self) -> bool:
        return any(result == "fail" for _, result, _ in self.checks)


MIN_STEP_S = 20  # a step given less than this is not started: it could not even start its Python and CUDA


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the table goes (default: runs/gpu-check/<card>-<date>.md)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check: the steps are run in order until it ends (default: all of them)")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget < MIN_STEP_S:
        parser.error(f"--budget {args.budget:g} is too short for any step of the check; give it at least {MIN_STEP_S} s (or leave it out)")
    if why := refusal():
        print(why, file=sys.stderr)
        sys.exit(1)
    import torch

    card = torch.cuda.get_device_name(0)
    out = args.out or ROOT / "runs" / "gpu-check" / f"{card.replace(' ', '-')}-{datetime.date.today().isoformat()}.md"
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    report = Report(out, card, args.budget)

    def not_reached(name: str) -> bool:
        left = report.left()
        if left is None or left >= MIN_STEP_S:
            return False
        report.checks.append((name, "skip", f"not reached: the budget of {args.budget:.0f} s was spent"))
        report.write()
        return True

    if not not_reached("CUDA suite"):
        checks, seconds = cuda_suite(work, report.left())
        report.checks += checks
        report.times.append(f"CUDA suite {seconds:.0f} s")
        report.write()
    for bench in BENCHES:
        if not_reached(" ".join(bench)):
            continue
        check, quoted = bench_step(list(bench), report.left())
        report.checks.append(check)
        report.quoted.append(quoted)
        report.write()
    if not not_reached("trainer runs"):
        checks, report.trainer_rows, report.data["rows"], seconds = trainer_table(work, budget=report.left())
        report.checks += checks
        report.times.append(f"trainer runs {seconds:.0f} s")
        report.write()
    print(report.text() + f"\nwritten to {out}, and its throughput table (mea-experiment SPEC --plan --throughput) to {out.with_suffix('.json')}")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
