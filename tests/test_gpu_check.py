"""`make gpu-check` where it can run here: its refusals in one line, its CUDA-suite report, its trainer table
over a CPU-sized multirun (the GPU's sizes are its own; the next GPU session runs it whole), and a budget's end:
a step interrupted so that it reports what it did, and what it did not reach named."""
import ast
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from mea.studies.plan import Rates
from mea.tools.gpu_check import BENCHES, NEEDED, Report, bench_step, cuda_suite, last_line, timed, trainer_table

from .conftest import QUICK, ROOT, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
def test_without_a_gpu_it_says_so_in_one_line():
    proc = run_cli("-m", "mea.tools.gpu_check")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu-check: no CUDA GPU is visible to torch {torch.__version__} here (torch.cuda.is_available() is False); run it on a GPU node"]


def test_a_bare_image_gets_the_missing_packages_named_in_one_line():
    """`python -S`: no site-packages, as on a GPU image with torch elsewhere and none of the project's dependencies."""
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from mea.tools.gpu_check import main; main()"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("gpu-check: torch, hydra, omegaconf, deepspeed,") and "are not installed for" in proc.stderr


def imported_on_load(files: list) -> set[str]:
    """The top-level names of the packages outside this repository and the standard library that loading these
    files imports: their module-level imports (in `if`, `try` and `with` too, not under TYPE_CHECKING), and those
    of the repository's modules they import, transitively."""
    def module_file(dotted: str):
        path = ROOT.joinpath(*dotted.split("."))
        return next((f for f in (path / "__init__.py", path.with_suffix(".py")) if f.is_file()), None)

    def on_load(statements):
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, (ast.If, ast.Try, ast.With)) and not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                yield from on_load(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []) + [s for h in getattr(node, "handlers", []) for s in h.body])

    found, read, pending = set(), set(), list(files)
    while pending:
        file = pending.pop()
        if file in read:
            continue
        read.add(file)
        package = file.relative_to(ROOT).parent.parts
        for node in on_load(ast.parse(file.read_text()).body):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) if node.level else node.module
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for name in names:
                parts = name.split(".")
                local = [f for f in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]  # packages on the way too
                if local:
                    pending += local
                elif parts[0] not in sys.stdlib_module_names and not (ROOT / parts[0]).exists():
                    found.add(parts[0])
    return found


def test_the_check_asks_for_every_package_its_steps_import():
    """A node that lacks one (lm-eval, left out of a wheelhouse built with --extras '') is refused in one line
    before anything runs, rather than the CUDA suite collecting nothing: pytest imports every test file."""
    assert imported_on_load([ROOT / "tests" / "conftest.py"]) >= {"pytest", "torch"}  # the walk finds what it should
    steps = [*(ROOT / "tests").glob("test_*.py"), ROOT / "train.py", *(ROOT / "bench").glob("*.py")]
    assert imported_on_load(steps) - set(NEEDED) == set()


def test_the_check_times_every_variant_eager_then_compiled_each_in_its_own_step():
    """Two steps, so that a budget ending among the compilations keeps the eager table; the compiled one holds the
    five variants (mha always runs), and its rows are ones the bench has: it parses them before it refuses --rounds 1."""
    from mea.models import REGISTRY

    eager, compiled = [list(b) for b in BENCHES if b[0] == "bench/train_step.py" and "--losses" not in b]
    assert eager[eager.index("--compile") + 1] == "off" and "--arms" not in eager
    assert compiled[compiled.index("--compile") + 1] == "on" and {"mha", *compiled[compiled.index("--arms") + 1].split(",")} == set(REGISTRY)
    proc = run_cli(*[("cpu" if a == "cuda" else a) for a in compiled], "--rounds", "1")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("--rounds 1: the ratios' quartiles need at least 2 rounds; pass --rounds 2 or more")


def test_the_cuda_suite_report_names_every_cuda_test(tmp_path):
    checks, _ = cuda_suite(tmp_path)
    names = {name for name, _, _ in checks}
    assert "test_cuda::test_out_of_memory_names_the_fix_and_the_same_command_resumes" in names
    assert any(name.startswith("test_attention::test_cached_decoding_equals_full_forward[") and "cuda" in name for name in names)
    assert any(name.startswith("test_compress::test_hlc_of_rank_at_most_g_converts_exactly") for name in names)
    if not torch.cuda.is_available():
        assert {(result, detail) for _, result, detail in checks} == {("skip", "needs a CUDA GPU"), ("skip", "needs two GPUs")}


CPU_TRAINER_RUN = (*QUICK, "trainer.max_steps=10", "trainer.eval_every=10", "trainer.dynamics=false")


def test_the_trainer_table_has_a_row_for_every_variant_and_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    checks, rows, throughput, _ = trainer_table(tmp_path, overrides=CPU_TRAINER_RUN, variants=("mea",), engines=("none", "zero2"))
    assert [(name, result) for name, result, _ in checks] == [("trainer mea · none", "pass"), ("trainer mea · zero2", "pass")]
    task = (tmp_path / "trainer" / "multirun.yaml").read_text()  # Hydra's sweep is the product of its overrides in order, the last fastest:
    assert task.index("- deepspeed=none,zero2") < task.index("- attention=mea")  # every variant under an engine before the next one
    assert all(re.fullmatch(r"[\d,]+ tokens/s, MFU nan, nan GiB", detail) for _, _, detail in checks)
    assert rows[0] == "| variant | engine | tokens/s | MFU | peak GiB | final loss |" and len(rows) == 2 + 2
    assert os.path.isfile(tmp_path / "trainer" / "attention=mea,deepspeed=zero2" / "summary.json")
    summary = json.loads((tmp_path / "trainer" / "attention=mea,deepspeed=none" / "summary.json").read_text())
    assert [(r["variant"], r["engine"], r["seq_len"], r["gpus"], r["flops_per_token"]) for r in throughput] == [("mea", "none", 64, 1, summary["flops_per_token"]),
                                                                                                       ("mea", "zero2", 64, 1, summary["flops_per_token"])]
    (tmp_path / "table.json").write_text(json.dumps({"card": "cpu", "rows": throughput}))  # what main writes beside the table: the rate --plan costs at
    assert Rates.from_table(tmp_path / "table.json").flops_per_s("mea") == throughput[0]["tokens_per_s"] * summary["flops_per_token"]


def test_a_budget_that_ends_before_the_trainer_runs_do_names_each_as_not_finished(tmp_path, monkeypatch):
    """Each run a skip that says so, not a failure: what did not fit the budget says nothing of the code."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    checks, rows, throughput, seconds = trainer_table(tmp_path, overrides=CPU_TRAINER_RUN, variants=("mea", "mha"), engines=("none", "zero1"), budget=2)
    assert [(name, result, detail) for name, result, detail in checks] == [(f"trainer {v} · {e}", "skip", "stopped after 2 s")
                                                                          for v in ("mea", "mha") for e in ("none", "zero1")]
    assert len(rows) == 2 and throughput == [] and seconds < 2 + 30


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_step_past_its_time_is_interrupted_and_reports_what_it_did(sigint):
    """SIGINT first: a step that handles it (pytest, a trainer) says what it did, also where the check itself
    ignores SIGINT, as a script's background job does (`make gpu-check &`); one that does not is killed after the grace."""
    says = "import signal, sys, time\nprint('round 1 done', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted')\n    sys.exit(1)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        proc, seconds = timed([sys.executable, "-c", says], timeout=3, grace=20)
        assert signal.getsignal(signal.SIGINT) is (signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)  # the check's own, as it was
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (proc.returncode, proc.stdout, proc.stderr) == (124, "round 1 done\ninterrupted\n", "stopped after 3 s") and seconds < 20
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    proc, seconds = timed([sys.executable, "-c", deaf], timeout=1, grace=1)
    assert proc.returncode == 124 and proc.stderr == "stopped after 1 s" and seconds < 10


def test_a_bench_stopped_by_the_budget_is_a_skip_quoted_with_what_it_printed():
    """A bench that SIGINT stops prints the rounds that had ended (tests/test_bench.py holds bench/train_step.py to
    that); the check quotes them, then its last words, and says in its cell that the budget stopped it."""
    bench = ("import sys, time\nprint('mha 1.000', flush=True)\nprint('round 1 of 9 done', file=sys.stderr, flush=True)\ntry:\n    time.sleep(60)\n"
             "except KeyboardInterrupt:\n    print('stopped by SIGINT: median of the 1 of 9 rounds that ended')\n    sys.exit(130)")
    check, quoted = bench_step(["-c", bench], budget=3)
    assert check == (f"-c {bench}", "skip", "stopped after 3 s")
    assert quoted.endswith("```\nmha 1.000\nstopped by SIGINT: median of the 1 of 9 rounds that ended\nround 1 of 9 done\nstopped after 3 s\n```")


def test_a_step_stopped_mid_line_ends_on_the_words_of_its_stop():
    """pytest stopped after its progress dots and before their newline: the CUDA suite's cell had read
    "ssss [100%]stopped after 2 s" (a `make test`, 2026-12-07)."""
    printing = "import sys, time\nsys.stdout.write('ssss [100%]')\nsys.stdout.flush()\ntime.sleep(60)"
    proc, _ = timed([sys.executable, "-c", printing], timeout=2, grace=5)
    assert proc.returncode == 124 and proc.stdout == "ssss [100%]" and last_line(proc) == "stopped after 2 s"


def test_a_cuda_suite_stopped_by_the_budget_is_a_skip_that_says_what_did_not_run(tmp_path):
    checks, _ = cuda_suite(tmp_path, budget=2)  # pytest alone takes longer than 2 s to collect the suite
    assert checks[-1] == ("CUDA suite", "skip", "stopped after 2 s: the tests not listed above did not run")


def test_the_report_is_written_whole_after_each_step(tmp_path):
    report = Report(tmp_path / "card.md", "cpu", budget=600)
    assert 590 < report.left() <= 600
    report.checks += [("CUDA suite", "skip", "stopped after 2 s: the tests not listed above did not run"), ("bench/decode.py --device cuda", "pass", "9 s")]
    report.times.append("CUDA suite 2 s")
    report.write()
    text = (tmp_path / "card.md").read_text()
    assert "2 checks: 1 pass, 0 fail, 1 skipped, in " in text and "(CUDA suite 2 s, budget 600 s)" in text and "| bench/decode.py --device cuda | pass | 9 s |" in text
    assert json.loads((tmp_path / "card.json").read_text())["rows"] == [] and not report.failed
    assert Report(tmp_path / "other.md", "cpu", budget=None).left() is None


def test_a_budget_too_short_for_any_step_is_refused_before_anything_runs():
    proc = run_cli("-m", "mea.tools.gpu_check", "--budget", "5")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("--budget 5 is too short for any step of the check; give it at least 20 s (or leave it out)")
