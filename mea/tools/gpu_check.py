"""`make gpu-check` (`mea-gpu-check`): does this GPU node run mea correctly, and how fast, in one table.

    make gpu-check                       # or: python -m mea.tools.gpu_check [--out FILE]

1. the CUDA suite (`pytest -m cuda`): each test passes, fails or skips;
2. bench/train_step.py (eager: its compiled half, `--compile both`, is a run of its own, untimed on a GPU yet), the
   same at model=125m for each loss form (`--preset 125m --losses`), and bench/decode.py, with --device cuda (presets
   that fit an 80 GB card), their tables quoted;
3. a short trainer run of each variant under each engine (plain PyTorch, ZeRO 1, 2, 3) at model=125m, T 1024,
   batch 16, in bf16, eager: tokens/s and MFU over its last 10 steps, and peak memory.

The table goes to stdout and to runs/gpu-check/<card>-<date>.md, which BENCHMARKS.md quotes; beside it, the
trainer runs' throughput as data (<card>-<date>.json), which `mea-experiment SPEC --plan --throughput` costs a sitting at. Where the project's
dependencies are missing (a bare GPU image), or no GPU is visible, it says so in one line and exits 1.
Imports the standard library alone until those checks pass.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("torch", "hydra", "omegaconf", "deepspeed", "datasets", "tokenizers", "wandb", "safetensors", "xxhash", "filelock", "psutil", "scipy", "pytest",
          "xdist", "pytest_timeout")  # import names of what train.py and the CUDA suite import
VARIANTS = ("mha", "mha_gn", "mea", "diff", "tha")
ENGINES = ("none", "zero1", "zero2", "zero3")
BENCHES = (("bench/train_step.py", "--device", "cuda", "--rounds", "2", "--compile", "off"),
           ("bench/train_step.py", "--device", "cuda", "--preset", "125m", "--losses", "--rounds", "3", "--compile", "off"),  # the LM head's loss, where it is largest
           ("bench/decode.py", "--device", "cuda"))
TRAINER_RUN = ("model=125m", "data.seq_len=1024", "trainer.global_batch=16", "trainer.max_steps=20", "trainer.log_every=10", "trainer.eval_every=20",
               "trainer.eval_batches=1", "trainer.dynamics=false", "trainer.sample_tokens=8", "trainer.device=cuda", "trainer.precision=bf16",
               "trainer.compile=false", "logger.mode=disabled")  # eager: 20 compilations would not fit 5 minutes


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


def timed(command: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(command, 124, e.stdout or "", f"timed out after {timeout} s")
    return proc, time.perf_counter() - start


def cuda_suite(folder: Path) -> tuple[list[tuple[str, str, str]], float]:
    """(check, result, detail) of every test `pytest -m cuda` collects, from its JUnit report."""
    report = folder / "cuda-suite.xml"
    workers = min(8, os.cpu_count() or 1)
    proc, seconds = timed([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-n", str(workers), "--dist", "loadgroup",
                           f"--junitxml={report}"], timeout=1800)
    if not report.is_file():
        return [("CUDA suite", "fail", (proc.stdout + proc.stderr).strip().splitlines()[-1] if proc.stdout + proc.stderr else f"exit {proc.returncode}")], seconds
    checks = []
    for case in ET.parse(report).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        result = {None: "pass", "failure": "fail", "error": "fail", "skipped": "skip"}[outcome.tag if outcome is not None else None]
        detail = (outcome.get("message") or "").splitlines()[0][:160] if outcome is not None and outcome.get("message") else ""
        checks.append((f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", result, detail))
    return checks, seconds


def trainer_table(folder: Path, overrides=TRAINER_RUN, variants=VARIANTS, engines=ENGINES) -> tuple[list[tuple[str, str, str]], list[str], list[dict], float]:
    """Every variant under every engine, one Hydra multirun (one process): a check each, the table's rows, and the
    throughput rows that `mea-experiment --plan` costs a sitting at."""
    sweep = folder / "trainer"
    fixed = ",".join(o.split("=")[0] for o in overrides)  # each run's folder is named by its variant and engine alone
    steps = int(next(o for o in overrides if o.startswith("trainer.max_steps=")).split("=")[1])
    proc, seconds = timed([sys.executable, "train.py", "-m", *overrides, f"attention={','.join(variants)}", f"deepspeed={','.join(engines)}", f"hydra.sweep.dir={sweep}",
                           "hydra.sweep.subdir=${hydra.job.override_dirname}", f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]"], timeout=1800)
    checks, rows, throughput = [], ["| variant | engine | tokens/s | MFU | peak GiB | final loss |", "|---|---|---:|---:|---:|---:|"], []
    for variant in variants:
        for engine in engines:
            metrics = sweep / f"attention={variant},deepspeed={engine}" / "metrics.jsonl"
            last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() and metrics.read_text().strip() else None
            if last is None or last["step"] != steps:  # a run that failed stops the multirun: the runs after it say why too
                checks.append((f"trainer {variant} · {engine}", "fail", (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the table goes (default: runs/gpu-check/<card>-<date>.md)")
    args = parser.parse_args(argv)
    if why := refusal():
        print(why, file=sys.stderr)
        sys.exit(1)
    import torch

    from mea.run_directory import write_synced

    card = torch.cuda.get_device_name(0)
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / "runs" / "gpu-check" / f"{card.replace(' ', '-')}-{today}.md"
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown"
    started = time.perf_counter()

    checks, suite_s = cuda_suite(work)
    benches, quoted = [], []
    for bench in BENCHES:
        proc, seconds = timed([sys.executable, *bench], timeout=900)
        benches.append((" ".join(bench), "pass" if proc.returncode == 0 else "fail", f"{seconds:.0f} s" if proc.returncode == 0 else proc.stderr.strip()[-160:]))
        quoted.append(f"`python {' '.join(bench)}`\n```\n{(proc.stdout if proc.returncode == 0 else proc.stderr[-3000:]).rstrip()}\n```")
    trainer_checks, trainer_rows, throughput, trainer_s = trainer_table(work)
    checks += benches + trainer_checks

    failed = [c for c in checks if c[1] == "fail"]
    lines = [f"# gpu-check: {card} · torch {torch.__version__} (CUDA {torch.version.cuda}) · {today} · commit {commit}", "",
             f"{len(checks) - len(failed)} of {len(checks)} checks pass ({sum(c[1] == 'skip' for c in checks)} skipped) in {time.perf_counter() - started:.0f} s "
             f"(CUDA suite {suite_s:.0f} s, trainer runs {trainer_s:.0f} s)", "",
             "| check | result | detail |", "|---|---|---|", *(f"| {name} | {result} | {detail.replace('|', '/')} |" for name, result, detail in checks), "",
             "Trainer runs (" + " ".join(TRAINER_RUN) + "):", "", *trainer_rows, "", *quoted]
    text = "\n".join(lines) + "\n"
    write_synced(out, text)
    write_synced(out.with_suffix(".json"), json.dumps({"card": card, "date": today, "commit": commit, "torch": torch.__version__, "rows": throughput}, indent=1))
    print(text + f"\nwritten to {out}, and its throughput table (mea-experiment SPEC --plan --throughput) to {out.with_suffix('.json')}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
