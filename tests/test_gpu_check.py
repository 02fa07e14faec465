"""`make gpu-check` where it can run here: its refusals in one line, its CUDA-suite report, and its trainer table
over a CPU-sized multirun (the GPU's sizes are its own; the next GPU session runs it whole)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mea.studies.plan import Rates
from mea.tools.gpu_check import cuda_suite, trainer_table

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


def test_the_cuda_suite_report_names_every_cuda_test(tmp_path):
    checks, _ = cuda_suite(tmp_path)
    names = {name for name, _, _ in checks}
    assert "test_cuda::test_out_of_memory_names_the_fix_and_the_same_command_resumes" in names
    assert any(name.startswith("test_attention::test_cached_decoding_equals_full_forward[") and "cuda" in name for name in names)
    assert any(name.startswith("test_compress::test_hlc_of_rank_at_most_g_converts_exactly") for name in names)
    if not torch.cuda.is_available():
        assert {(result, detail) for _, result, detail in checks} == {("skip", "needs a CUDA GPU"), ("skip", "needs two GPUs")}


def test_the_trainer_table_has_a_row_for_every_variant_and_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    checks, rows, throughput, _ = trainer_table(tmp_path, overrides=(*QUICK, "trainer.max_steps=10", "trainer.eval_every=10", "trainer.dynamics=false"),
                                    variants=("mea",), engines=("none", "zero2"))
    assert [(name, result) for name, result, _ in checks] == [("trainer mea · none", "pass"), ("trainer mea · zero2", "pass")]
    assert all(re.fullmatch(r"[\d,]+ tokens/s, MFU nan, nan GiB", detail) for _, _, detail in checks)
    assert rows[0] == "| variant | engine | tokens/s | MFU | peak GiB | final loss |" and len(rows) == 2 + 2
    assert os.path.isfile(tmp_path / "trainer" / "attention=mea,deepspeed=zero2" / "summary.json")
    summary = json.loads((tmp_path / "trainer" / "attention=mea,deepspeed=none" / "summary.json").read_text())
    assert [(r["variant"], r["engine"], r["seq_len"], r["gpus"], r["flops_per_token"]) for r in throughput] == [("mea", "none", 64, 1, summary["flops_per_token"]),
                                                                                                       ("mea", "zero2", 64, 1, summary["flops_per_token"])]
    (tmp_path / "table.json").write_text(json.dumps({"card": "cpu", "rows": throughput}))  # what main writes beside the table: the rate --plan costs at
    assert Rates.from_table(tmp_path / "table.json").flops_per_s("mea") == throughput[0]["tokens_per_s"] * summary["flops_per_token"]
