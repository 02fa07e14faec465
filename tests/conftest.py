import importlib
import io
import os
import subprocess
import sys
import warnings
from contextlib import chdir, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import psutil
import pytest
import torch
from hydra import compose, initialize_config_dir

from mea.config import register_configs
from mea.tools.gpu_check import interruptible

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

register_configs()
# One thread a process: the models here are tiny, and `make test` runs a test process per core (pytest-xdist), each
# starting training subprocesses; more threads than cores would leave OpenMP spinning against itself.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MEA_SWEEP_JOBS"] = "1"  # likewise one run at a time in a sweep: the test processes already fill the cores
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def at_the_root():
    """Every test from the repository's root, as the README's commands run, wherever pytest was started (`cd tests;
    pytest`): specs and configs name their files from there (`previous_report: docs/results/…`)."""
    os.chdir(ROOT)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One prepared-data cache for the whole run, shared by its test processes (one of them prepares a corpus, the
    others asking for it meanwhile wait for it), inherited by subprocesses through MEA_CACHE."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mea-cache"
    path.mkdir(exist_ok=True)
    os.environ["MEA_CACHE"] = str(path)
    os.environ["WANDB_SILENT"] = "true"
    return path


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not there (the shared corpora sit beside the checkout)")
    return SHAKESPEARE


def compose_config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"run_dir={run_dir}"])


# A run small enough for seconds on 2 cores that still learns something on real text.
QUICK = ("logger.mode=disabled", "data.seq_len=64", "trainer.global_batch=8", "trainer.log_every=5", "trainer.eval_batches=2", "trainer.sample_tokens=8")


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_tool(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command's main(argv) run in this test process, its exit status and output as run_cli returns them: for a
    test of what a command prints, writes or refuses, where a process of its own adds only its start-up (torch and
    its compiler imported: 4 of the 5-7 CPU-seconds a planning, fitting or launching command takes on 2 cores, and
    the suite is bound by its CPU). Tests of signals, kills, processes and training keep run_cli."""
    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.copy()
    os.environ.update(env or {})
    try:
        with chdir(ROOT), redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # a fresh interpreter's filters, its warnings written to stderr as a process writes them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                importlib.import_module(module).main(list(args))
            finally:
                err.write("".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to a process and every process under it (torchrun and mea-sweep start theirs in sessions of their own)."""
    if proc.poll() is None:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    proc.wait()


@contextmanager
def started(args: list[str], **popen):
    """A process the test drives, which SIGINT interrupts however the suite was started (a script's `make test &`
    ignores it); it and its children are killed when the block ends, however the test ends."""
    proc = interruptible(args, **popen)
    try:
        yield proc
    finally:
        kill_tree(proc)


# The files start longest first (the Makefile keeps this order with --no-loadscope-reorder; xdist's own puts the
# files with most tests first, which left the longest to start last and run on alone at the end), the small ones
# after them filling the gaps. Every file is listed, by its worker-seconds in one run of the whole suite on 2 cores
# (2026-12-06; `make test` and `make test-slow` each keep this order): test_train.py (58-76 s), left off the list,
# had started last and filled the run's last minute alone.
LONGEST_FIRST = ("test_slurm.py", "test_trainer.py", "test_faults.py", "test_protocol_micro.py", "test_scaling.py", "test_experiment.py", "test_launch.py",
                 "test_compare.py", "test_train.py", "test_data.py", "test_gpu_check.py", "test_eval.py", "test_attention.py", "test_distributed.py",
                 "test_compress.py", "test_loss.py", "test_dynamics.py", "test_wheelhouse.py", "test_bench.py", "test_effects.py", "test_cpu_heap.py",
                 "test_init.py", "test_model.py", "test_optim.py", "test_style.py", "test_published.py", "test_cuda.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
