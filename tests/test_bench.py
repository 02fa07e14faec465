"""The benchmark scripts run and print what BENCHMARKS.md records, importing torch and mea.models only (the GPU
machine has nothing else). Figures are never asserted here: timings belong to the benchmarks themselves."""
import re
import signal
import subprocess
import sys

import pytest

from .conftest import run_cli, started

NOT_ON_THE_GPU_MACHINE = ["hydra", "omegaconf", "deepspeed", "wandb", "datasets"]


def run_bench(script: str, *args: str):
    """Runs bench/<script> as `python bench/<script>` would, then fails if it imported a package the GPU machine lacks."""
    code = (f"import runpy, sys; sys.argv = ['bench/{script}', *{list(args)!r}]; runpy.run_path('bench/{script}', run_name='__main__'); "
            f"extra = sorted(set({NOT_ON_THE_GPU_MACHINE!r}) & set(sys.modules)); assert not extra, f'imported {{extra}}'")
    proc = run_cli("-c", code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_step_bench_prints_every_variant_against_mha():
    from mea.models import REGISTRY

    out = run_bench("train_step.py", "--preset", "smoke")
    assert re.search(r"device: CPU .*, \d+ threads .* freed memory kept", out) and "measured matmul peak" in out
    rows = {m[1]: m for m in re.finditer(r"^(\S+(?: \([^)]+\))?) +4 +([\d,]+) +([\d.]+) +([\d.]+)–([\d.]+) +([\d.]+)% +([\d,]+) +([\d.]+) +([\d.]+) +([\d,]+)$", out, re.M)}
    assert set(rows) == set(REGISTRY) | {"mea (einsum HLC)", "diff (paired heads)", "mha (full CE)"}  # each at the preset's batch, 4
    assert rows["mha"][3] == rows["mha"][4] == rows["mha"][5] == rows["mha"][8] == "1.000"
    assert all(float(r[4]) <= float(r[3]) <= float(r[5]) and 0 < float(r[6]) < 100 and float(r[9]) > 0 for r in rows.values())
    assert all(float(r[10].replace(",", "")) > 0 for r in rows.values())  # a CPU's step peak (PeakTensorBytes)
    assert "did not fit" not in out
    assert "dyn pass: one dynamics pass (eval steps only)" in out



def test_train_step_bench_runs_the_arms_asked_for_against_mha():
    out = run_bench("train_step.py", "--preset", "smoke", "--arms", "mea,mha_gn")
    assert re.findall(r"^(\S+(?: \([^)]+\))?) +4 +[\d,]+ ", out, re.M) == ["mha", "mea", "mha_gn"]  # mha, the baseline, though not asked for
    wrong = run_cli("bench/train_step.py", "--arms", "mea,tah")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith(
        "train_step.py: error: --arms: no row named 'tah' here; choose among: mha, diff, diff (paired heads), mea,")


# rounds that end on their own, in seconds, should the line never come: 200 smoke rounds, 2 of cpu-long after 6 s first turns
@pytest.mark.parametrize("preset, rounds, said", [("smoke", 200, "round 1 of 200 done"), ("cpu-long", 2, "first turn of mha · eager")])
def test_train_step_bench_stopped_by_sigint_reports_the_rounds_that_ended(preset, rounds, said):
    """gpu-check ends a step at its budget's end with SIGINT: the table over the rounds that had ended comes out, not
    a traceback; stopped before any had, it says how far the first turns got."""
    with started([sys.executable, "bench/train_step.py", "--preset", preset, "--arms", "mea", "--rounds", str(rounds)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            if line.startswith(said):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    if preset == "cpu-long":
        assert out == "stopped before the first round ended: 1 of 2 arms had their first turn; nothing was timed\n"
        return
    ended = re.search(r"; stopped by SIGINT: median of the (\d+) of 200 rounds that ended × 1 steps$", out, re.M)
    assert ended and int(ended[1]) >= 1, out  # mostly 1: its middle half is its one ratio
    assert re.findall(r"^(\S+) +4 +[\d,]+ +([\d.]+) ", out, re.M)[0] == ("mha", "1.000") and re.search(r"^mea +4 +[\d,]+ +[\d.]+ ", out, re.M)


def test_decode_bench_halves_the_cache():
    out = run_bench("decode.py", "--preset", "smoke")
    assert re.search(r"^measured copy bandwidth: [\d.]+ GB/s$", out, re.M)
    cache = {m[1].strip(): float(m[3]) for m in re.finditer(r"^(.{24}) +([\d.]+) +[\d.]+ +([\d.]+) +([\d.]+)$", out, re.M)}
    assert cache["half cache, absorbed"] == cache["half cache, expanded"] == cache["full cache (H heads)"] / 2
