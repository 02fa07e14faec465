"""Runs per hour of a local LR sweep: one run at a time on all cores (the serial sweep) against one run per core
side by side (mea-sweep's default through hydra-joblib-launcher), the same spec, measured one after the other
in one sitting.

    python bench/sweep_throughput.py [--runs 6] [--steps 100] [--model tiny]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
name: throughput
variants: [mea]
sizes:
  - {{model: {model}, tokens: {tokens}}}
lr_min: 1.0e-3
lr_max: 1.0e-2
lr_points: {runs}
overrides: [data.seq_len=128, trainer.global_batch=16, logger.mode=disabled, trainer.log_every=25, trainer.eval_batches=2, trainer.sample_tokens=4]
out: {out}
"""


def sweep(folder: Path, name: str, model: str, runs: int, steps: int, jobs: int, threads: int) -> float:
    spec = folder / f"{name}.yaml"
    spec.write_text(SPEC.format(model=model, tokens=steps * 16 * 128, runs=runs, out=folder / name))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "sweeps" / "lr_sweep.py"), str(spec), "--jobs", str(jobs), "--threads", str(threads)],
                   cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep(folder, "warmup", args.model, 3, 5, 1, cores)  # the corpus is tokenised once, before anything is timed
        serial = sweep(folder, "serial", args.model, args.runs, args.steps, 1, cores)
        parallel = sweep(folder, "parallel", args.model, args.runs, args.steps, cores, 1)
    print(f"{args.runs} runs of {args.steps} steps, model={args.model}, {cores} cores")
    print(f"serial   (1 run at a time × {cores} threads): {serial:6.1f} s  {args.runs / serial * 3600:7.0f} runs/hour")
    print(f"parallel ({cores} runs at a time × 1 thread):  {parallel:6.1f} s  {args.runs / parallel * 3600:7.0f} runs/hour")
    print(f"parallel / serial: {serial / parallel:.2f}x runs per hour")


if __name__ == "__main__":
    main()
