"""What users run, on a GPU: every engine on one curve, a SIGKILL resumed, compilation and recomputation on every
variant, export, generation and evaluation of a GPU-trained run, the cluster check's NCCL all-reduce, and an
out-of-memory that names its fix and loses nothing. Marked `cuda`; skipped without a GPU (`make gpu-check` runs
them). The attention, decoding and compression checks on the GPU are in test_attention.py and test_compress.py
(their `device` parameter).

Each group of runs is one process (a Hydra multirun) where it can be: a process start costs more than a run of
the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mea.distributed import free_port

from .conftest import QUICK, ROOT, run_cli
from .test_trainer import RUN, assert_curves_close, kill_when, rows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_RUN = (*RUN, "trainer.device=cuda", "trainer.compile=false")  # eager unless a test compiles: auto compiles on a GPU
ENGINES = ("none", "zero1", "zero2", "zero3", "zero3_offload")
VARIANTS = ("mha", "mha_gn", "mea", "diff", "tha")
FP32_REL, BF16_REL = 1e-4, 5e-3  # the engines sum gradients in other orders; bf16 carries that further


def multirun(folder: Path, *overrides: str, timeout: int = 900) -> Path:
    """Each job's run directory is named by the overrides swept (`deepspeed=zero1,trainer.precision=bf16`)."""
    fixed = ",".join(o.split("=")[0] for o in overrides if "," not in o.split("=", 1)[1])
    proc = run_cli("train.py", "-m", *overrides, f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                   f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def run_of(folder: Path, *overrides: str) -> Path:
    """The run directory of a multirun's job with these overrides (Hydra names it by them, sorted; booleans as True)."""
    (match,) = [d for d in folder.iterdir() if d.is_dir() and all(o.lower() in d.name.lower().split(",") for o in overrides)]
    return match


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    """Every engine on one GPU, in fp32 and in bf16: ten runs in one process."""
    return multirun(tmp_path_factory.mktemp("engines"), *GPU_RUN, f"deepspeed={','.join(ENGINES)}", "trainer.precision=fp32,bf16")


@pytest.mark.xdist_group("engines")
@pytest.mark.parametrize("engine", ENGINES[1:])
@pytest.mark.parametrize("precision, rel", [("fp32", FP32_REL), ("bf16", BF16_REL)])
def test_every_engine_follows_the_plain_curve_on_a_gpu(engines, engine, precision, rel):
    plain = run_of(engines, "deepspeed=none", f"trainer.precision={precision}")
    assert_curves_close(plain, run_of(engines, f"deepspeed={engine}", f"trainer.precision={precision}"), rel=rel)
    assert rows(plain)[-1]["loss"] < rows(plain)[0]["loss"] and 0 < rows(plain)[-1]["peak_memory_gib"]


@pytest.mark.xdist_group("engines")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_two_gpus_follow_one(engines, engine, tmp_path):
    proc = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train.py", *GPU_RUN,
                   "trainer.precision=fp32", f"deepspeed={engine}", f"hydra.run.dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cuda" in proc.stdout
    assert_curves_close(run_of(engines, "deepspeed=none", "trainer.precision=fp32"), tmp_path, rel=FP32_REL)


@pytest.mark.xdist_group("engines")
def test_sigkill_then_resume_on_a_gpu(engines, tmp_path):
    args = [*GPU_RUN, "trainer.precision=fp32", "trainer.checkpoint_every=5", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, (tmp_path / "checkpoints" / "step-0000010").exists)
    resumed = run_cli("train.py", *args)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert_curves_close(run_of(engines, "deepspeed=none", "trainer.precision=fp32"), tmp_path, rel=FP32_REL)


@pytest.mark.xdist_group("engines")
def test_export_generate_and_evaluate_a_gpu_trained_run(engines, tmp_path):
    run = run_of(engines, "deepspeed=zero2", "trainer.precision=bf16")
    assert run_cli("-m", "mea.tools.export", str(run), str(tmp_path / "exported")).returncode == 0
    generated = run_cli("-c", "from mea.tools.export import generate_main; generate_main()", str(tmp_path / "exported"), "--tokens", "8", "--device", "cuda")
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stderr[-3000:]
    evaluated = run_cli("-m", "mea.eval.perplexity", str(tmp_path / "exported"), "data.seq_len=64")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["val_loss"] == pytest.approx(json.loads((run / "summary.json").read_text())["final_val_loss"], rel=0.05)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.xdist_group(f"compile-{v}")) for v in VARIANTS])  # side by side
def test_compiled_and_recomputed_follow_eager_on_a_gpu(variant, tmp_path):
    """Eager, recomputed (activation checkpointing), compiled (one graph) and both, in fp32: one process a variant."""
    runs = multirun(tmp_path, *GPU_RUN[:-1], "trainer.precision=fp32", f"attention={variant}", "trainer.compile=false,true",
                    "trainer.activation_checkpointing=false,true", timeout=1800)
    eager = run_of(runs, "trainer.compile=false", "trainer.activation_checkpointing=false")
    for compiled, recomputed in (("false", "true"), ("true", "false"), ("true", "true")):
        assert_curves_close(eager, run_of(runs, f"trainer.compile={compiled}", f"trainer.activation_checkpointing={recomputed}"), rel=1e-3)


def test_the_cluster_check_all_reduces_through_nccl(tmp_path):
    proc = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   "-m", "mea.tools.cluster_check", str(tmp_path), *QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = (tmp_path / "cluster-check" / "report.txt").read_text()
    assert "PASS all-reduce: 64 MiB across 1 ranks" in report and "exact" in report and "FAIL" not in report


AT_125M_T2048 = ("model=125m", "logger.mode=disabled", "data.seq_len=2048", "trainer.eval_batches=1", "trainer.sample_tokens=8", "trainer.dynamics=false",
                 "trainer.device=cuda", "trainer.compile=false")  # the 125m model at T 2048, eager: the runs that fill much of the card


@pytest.mark.xdist_group("card")
def test_out_of_memory_names_the_fix_and_the_same_command_resumes(tmp_path):
    """A step that cannot fit (a micro-batch of 256 windows of 2048 tokens of the 125m model: hundreds of GiB of
    activations) stops with one line naming the micro batch, what it asked for, the card and the fixes; the
    checkpoint before it stays, and a micro batch that fits resumes from it."""
    args = [*AT_125M_T2048, "trainer.global_batch=256", f"hydra.run.dir={tmp_path}"]
    first = run_cli("train.py", *args, "trainer.micro_batch=8", "trainer.max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    more = [*args, "trainer.max_steps=2", "trainer.amend=[trainer.max_steps]"]
    failed = run_cli("train.py", *more, "trainer.micro_batch=256")
    assert failed.returncode != 0
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error: out of GPU memory")]
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert line.startswith("error: out of GPU memory at trainer.micro_batch=256 per GPU, asking for ") and f"on a card of {total:.1f} GiB" in line
    assert "lower trainer.micro_batch" in line and "trainer.activation_checkpointing=true" in line
    assert failed.stderr.index(line) < failed.stderr.rindex("OutOfMemoryError")  # the line, then the traceback
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-0000001"]
    resumed = run_cli("train.py", *more, "trainer.micro_batch=8")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert rows(tmp_path)[-1]["step"] == 2 and os.path.isfile(tmp_path / "summary.json")


CARD_80GB_GIB = 78  # what an 80 GB card (79.6 GiB) leaves a run's tensors past the CUDA context and the allocator's slack


@pytest.mark.xdist_group("card")  # one after the other: each fills much of the card (the suite's other tests take little)
def test_tha_fits_the_125m_model_at_t2048_batch16_on_an_80gb_card(tmp_path):
    """Talking-heads mixes every head's T×T map; held whole for backward they took 89.1 GiB at 125m with 32 × 1,024
    tokens a step. Chunked over query blocks and recomputed (mea.models.attention.tha), a step of 16 × 2,048 tokens,
    eager in bf16 with the whole batch at once, keeps under what an 80 GB card holds."""
    args = [*AT_125M_T2048, "attention=tha", "trainer.global_batch=16", "trainer.micro_batch=16", "trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_every=2",
            "trainer.precision=bf16", f"hydra.run.dir={tmp_path}"]
    proc = run_cli("train.py", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = max(row["peak_memory_gib"] for row in rows(tmp_path) if "peak_memory_gib" in row)
    assert 0 < peak < CARD_80GB_GIB, f"tha at 125m, T 2048, batch 16 peaked at {peak:.1f} GiB"


def test_compile_auto_and_bf16_are_on_for_a_gpu(tmp_path):
    from omegaconf import OmegaConf

    from mea.train.loop import resolve

    from .conftest import compose_config

    cfg = resolve(OmegaConf.to_object(compose_config(tmp_path, *QUICK)), torch.device("cuda"))
    assert cfg.trainer.compile is True and cfg.trainer.precision == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32")
