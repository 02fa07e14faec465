"""The trainer on real computation: DeepSpeed ZeRO on 2 CPU processes over gloo, exact resume after SIGKILL,
preemption by SIGTERM, atomic checkpoints, non-finite losses, W&B offline."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_model

from mea.config import ConfigError, TrainConfig, validate
from mea.models import LM
from mea.run_directory import RunDirectory
from mea.train import checkpoint
from mea.distributed import free_port
from mea.train.engine import PlainEngine

from .conftest import QUICK, ROOT, compose_config, kill_tree, run_cli, started
from .test_attention import DEVICES
from .wandb_log import read_run

RUN = (*QUICK, "trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.peak_tflops=1")  # a peak: MFU is logged on the CPU too
CURVE = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in CURVE) for r in rows(run_dir)]


def torchrun(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return run_cli(*args, "train.py", *overrides, f"hydra.run.dir={run_dir}", env={"DS_ACCELERATOR": "cpu"}, timeout=600)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    proc = run_cli("train.py", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_curves_close(a: Path, b: Path, rel: float) -> None:
    for ra, rb in zip(rows(a), rows(b), strict=True):
        assert ra["step"] == rb["step"] and ra["tokens"] == rb["tokens"]
        dynamics = [k for k in ra if k.startswith("dyn/")]  # measured on the full weights, whatever the ZeRO stage
        assert dynamics == [k for k in rb if k.startswith("dyn/")] and ("val_loss" in ra) == bool(dynamics)
        for key in ("loss", "lr", "grad_norm", "val_loss", *dynamics):
            if key in ra:  # a gradient norm sums in another order across ranks: looser
                assert rb[key] == pytest.approx(ra[key], rel=rel * (10 if key == "grad_norm" else 1)), (key, ra, rb)


# A multirun in one process, as Hydra's own launcher and joblib's reused workers run one: then the tensors Python can
# still reach, and the bytes a GPU still has allocated.
MULTIRUN_THEN_LIVE_TENSORS = """
import json, runpy, sys
import torch
from tests.engine_probe import live_storages
sys.argv = ["train.py", "-m", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
print(json.dumps({"live": live_storages(), "gpu_allocated": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0}))
"""


@pytest.mark.parametrize("device", DEVICES)
def test_a_multirun_leaves_nothing_of_a_run_in_its_process(device, tmp_path):
    """Each run of a multirun under every engine: once it ends, no tensor of its model, gradients or optimizer is
    left for the next run's memory. Before DeepSpeed's engines were released (Engine.close), the tiny model's four
    runs left 2.1 GB on a CPU (ZeRO-3 alone a 2 GB bucket a run): on a GPU the later runs of a sweep would have run
    out, and each run's logged peak would have counted the runs before it."""
    proc = run_cli("-c", MULTIRUN_THEN_LIVE_TENSORS, *QUICK, "model=tiny", "trainer.max_steps=2", "trainer.eval_every=2", "deepspeed=none,zero1,zero2,zero3",
                   f"trainer.device={device}", "trainer.compile=false", f"hydra.sweep.dir={tmp_path}", env={"DS_ACCELERATOR": device})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*/summary.json"))) == 4  # every run finished
    left = json.loads(proc.stdout.splitlines()[-1])
    assert sum(nbytes for nbytes, _ in left["live"]) < 2**20, left["live"][:5]  # the model alone is 7 MiB; torch may keep a small constant
    assert left["gpu_allocated"] < 2**20, left["gpu_allocated"]


def test_plain_pytorch_equals_zero0_on_one_process(single_process, tmp_path):
    proc = run_cli("train.py", *RUN, "deepspeed=zero0", f"hydra.run.dir={tmp_path}", env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed" in proc.stdout
    assert_curves_close(single_process, tmp_path, rel=1e-5)


@pytest.mark.parametrize("preset, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_zero_on_two_processes_matches_one_process(preset, stage, single_process, tmp_path):
    proc = torchrun(tmp_path, *RUN, f"deepspeed={preset}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '2 process(es)' in proc.stdout and f'"stage": {stage}' in proc.stdout
    assert ('"offload_optimizer"' in proc.stdout) == preset.endswith("offload")
    assert_curves_close(single_process, tmp_path, rel=1e-4)
    summary, plain = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, single_process))
    counts = ("params", "non_embedding_params", "flops_per_token")  # from the config, whatever ZeRO left in the tensors
    assert [summary[k] for k in counts] == [plain[k] for k in counts] and plain["params"] > plain["non_embedding_params"] > 0
    assert f"{plain['params']:,} parameters ({plain['non_embedding_params']:,} non-embedding), {plain['flops_per_token']:,.0f} FLOPs a token" in proc.stdout
    for row, plain_row in zip(rows(tmp_path), rows(single_process), strict=True):  # MFU = tokens/s × FLOPs a token / processes / peak
        assert row["mfu"] * 2 / row["tokens_per_s"] == pytest.approx(plain_row["mfu"] / plain_row["tokens_per_s"], rel=1e-12)
    if stage == 3:  # the ZeRO-3 checkpoint consolidates into one safetensors file a single-process model loads
        check_single_process_load(tmp_path, summary["final_val_loss"])


def check_single_process_load(run_dir: Path, val_loss: float) -> None:
    from mea.config import load_config
    from mea.data import TokenWindows, prepare, validation_batches

    cfg = load_config(run_dir / "config.yaml")
    model = LM(cfg.model, cfg.attention).eval()
    load_model(model, str(run_dir / "checkpoints" / "step-0000020" / "model.safetensors"))
    windows = TokenWindows(prepare(cfg.data, log=lambda _: None).shards("val"), cfg.data.seq_len)
    with torch.no_grad():
        losses = [model(x, y).item() for x, y in validation_batches(windows, cfg.trainer.eval_batches * cfg.trainer.global_batch, 4)]
    assert sum(losses) / len(losses) == pytest.approx(val_loss, rel=1e-5)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    deadline = time.time() + 300
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        kill_tree(proc)


def test_zero3_kill_and_resume_on_two_processes(tmp_path, single_process):
    args = [*RUN, "deepspeed=zero3", "trainer.checkpoint_every=5"]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "train.py", *args, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, (tmp_path / "checkpoints" / "step-0000010").exists)
    resumed = torchrun(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_curves_close(single_process, tmp_path, rel=1e-4)


def test_sigterm_saves_a_checkpoint_that_resumes_under_the_same_wandb_run(tmp_path):
    args = [*[a for a in QUICK if not a.startswith("logger")], "logger.mode=offline", "trainer.max_steps=60", "trainer.checkpoint_every=0"]
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}"]
    with started(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stop signal: saved" in out
    (saved,) = RunDirectory(tmp_path).checkpoints()
    step = checkpoint.read_state(saved)["step"]
    assert 5 <= step < 60
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout
    assert rows(tmp_path)[-1]["step"] == 60
    wandb_id = checkpoint.read_state(saved)["wandb_id"]
    assert wandb_id and {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("wandb/offline-run-*")} == {wandb_id}


def plain_engine(tmp_path: Path) -> PlainEngine:
    from omegaconf import OmegaConf

    cfg: TrainConfig = OmegaConf.to_object(compose_config(tmp_path, *QUICK))
    cfg.model.vocab_size = 64
    torch.manual_seed(0)
    return PlainEngine(LM(cfg.model, cfg.attention), cfg, torch.device("cpu"), micro_batch=4)


def test_a_save_interrupted_at_any_stage_leaves_the_previous_checkpoint_loadable(tmp_path):
    engine = plain_engine(tmp_path)
    x = torch.randint(0, 64, (8, 16))
    engine.train_step(x, x)
    good = checkpoint.save(engine, RunDirectory(tmp_path), {"step": 1}, keep=1)
    engine.train_step(x, x)
    complete = tmp_path / "complete"
    complete.mkdir()
    engine.save(complete)
    stages = [[], ["model.safetensors"], ["model.safetensors", "optimizer.pt"]]  # what a kill may leave
    for files in stages:
        tmp = tmp_path / "checkpoints" / ".tmp-step-0000002"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in files:
            (tmp / name).write_bytes((complete / name).read_bytes()[: len((complete / name).read_bytes()) // 2])
        assert checkpoint.find_resume_point(RunDirectory(tmp_path), True, None, rank=0) == good
        fresh = plain_engine(tmp_path)
        assert checkpoint.load(fresh, good)["step"] == 1
    assert checkpoint.save(engine, RunDirectory(tmp_path), {"step": 2}, keep=1).name == "step-0000002"  # the stale temp is replaced
    assert [p.name for p in RunDirectory(tmp_path).checkpoints()] == ["step-0000002"]


def test_a_non_finite_loss_skips_the_step(tmp_path):
    engine = plain_engine(tmp_path)
    x = torch.randint(0, 64, (8, 16))
    engine.train_step(x, x)
    with torch.no_grad():
        engine.model.embed.weight[x[0, 0]] = float("nan")
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    opt_before = {k: v["exp_avg"].clone() for k, v in enumerate(engine.optimizer.state.values())}
    loss, grad_norm = engine.train_step(x, x)
    assert loss != loss and grad_norm != grad_norm  # NaN reported
    for k, v in engine.model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0)
    for k, v in enumerate(engine.optimizer.state.values()):
        assert torch.equal(v["exp_avg"], opt_before[k])


def test_diverging_run_stops_after_k_bad_steps(tmp_path):
    proc = run_cli("train.py", *QUICK, "optim.lr=1e9", "optim.grad_clip=1e9", "scheduler=constant", "scheduler.warmup_steps=1", "trainer.max_steps=100",
                   "trainer.max_bad_steps=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar, one line
    assert last.startswith("error: the loss was not finite for 3 steps in a row") and "lower optim.lr" in last


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"} | {"NETRC": str(tmp_path / "no-netrc")}
    args = [*[a for a in RUN if not a.startswith("logger")], "logger.mode=online", "logger.group=exp1", "logger.tags=[a,b]", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B has no API key here" in proc.stderr  # online without a key falls back to offline, with one warning
    logged = read_run(tmp_path)
    assert logged["config"]["attention"]["name"] == "mea" and logged["config"]["model"]["name"] == "tiny"
    assert logged["group"] == "exp1" and logged["tags"] == ["a", "b", "variant:mea", "size:tiny", "lr:0.003", "seed:0"]
    history = [h for h in logged["history"] if "loss" in h]
    assert [h["loss"] for h in history] == [r["loss"] for r in rows(tmp_path)]
    assert logged["summary"]["final_val_loss"] == json.loads((tmp_path / "summary.json").read_text())["final_val_loss"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["deepspeed.stage=5"], "deepspeed.stage=5 is not allowed; choose one of: 0, 1, 2, 3"),
        (["deepspeed=zero2", "deepspeed.offload_params=true"], "deepspeed.offload_params needs ZeRO stage 3"),
        (["deepspeed=zero0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3"),
        (["trainer.global_batch_tokens=100"], "trainer.global_batch_tokens=100 is not a positive multiple of data.seq_len=64"),
    ],
)
def test_bad_trainer_settings_fail_before_compute(overrides, message, tmp_path):
    """The check train.py makes first, called here directly (a process each would be 7 s of start-up apiece); the
    command's own one-line exit is the test below."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(tmp_path, *QUICK, *overrides))


def test_a_bad_setting_exits_in_one_line_before_compute(tmp_path):
    proc = run_cli("train.py", *QUICK, "trainer.resume_from=/nonexistent/ckpt", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: trainer.resume_from='/nonexistent/ckpt' is not a checkpoint folder (no trainer_state.json); give a <run_dir>/checkpoints/step-* folder"], proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_with_another_model_shape_is_refused(single_process, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(single_process, run_dir)
    proc = run_cli("train.py", *RUN, "model.n_layers=2", "trainer.max_steps=30", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert "holds another run (model.n_layers: 4 recorded, 2 now, trainer.max_steps: 20 recorded, 30 now)" in proc.stderr
    other = tmp_path / "other"  # another run's checkpoint, given by hand
    proc = run_cli("train.py", *RUN, "model.n_layers=2", f"trainer.resume_from={run_dir}/checkpoints/step-0000020", f"hydra.run.dir={other}")
    assert proc.returncode == 2 and "does not fit this config (model.n_layers: checkpoint 4 vs config 2)" in proc.stderr


def test_a_process_count_that_does_not_divide_the_batch_stops_before_the_group_starts(tmp_path):
    proc = torchrun(tmp_path, *RUN, "deepspeed=zero2", nproc=3)
    assert proc.returncode != 0
    assert "error: trainer.global_batch=8 is not a multiple of trainer.micro_batch=2 × world size 3; change one of them" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and "DeepSpeed" not in proc.stdout


def test_several_processes_need_deepspeed(tmp_path):
    proc = torchrun(tmp_path, *RUN)
    assert proc.returncode != 0 and "deepspeed=none; choose deepspeed=zero1" in proc.stderr


@pytest.mark.parametrize("overrides", [["trainer.activation_checkpointing=true"], ["trainer.global_batch=1", "trainer.global_batch_tokens=512"], ["trainer.micro_batch=2"]])
def test_same_curve_with_recomputation_token_batches_or_accumulation(overrides, single_process, tmp_path):
    proc = run_cli("train.py", *RUN, *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_curves_close(single_process, tmp_path, rel=1e-5)


def test_torch_compile_trains_to_the_same_curve(single_process, tmp_path):
    proc = run_cli("train.py", *RUN, "trainer.compile=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_curves_close(single_process, tmp_path, rel=1e-3)


VARIANTS = ("mha", "mha_gn", "mea", "diff", "tha")


def test_bf16_on_cpu_runs_under_autocast_and_tracks_fp32(tmp_path):
    """trainer.precision=bf16 on a CPU trains every variant under CPU autocast (bf16 matmuls, the GPU's
    mixed-precision path): not bitwise the fp32 run, within 1% of its loss at each of 6 steps. One Hydra multirun
    trains the ten runs in one process. Few steps: without AVX-512 a CPU's bf16 matmul is 10-25x slower than fp32
    (56 ms against 5.3 ms for 512x64 by 64x2048 here; a tha run of 20 steps 37 s against 11 s)."""
    proc = run_cli("train.py", "-m", *QUICK, "trainer.max_steps=6", "trainer.log_every=1", "trainer.checkpoint_every=0", f"attention={','.join(VARIANTS)}", "trainer.precision=fp32,bf16",
                   f"hydra.sweep.dir={tmp_path}",
                   "hydra.sweep.subdir=${attention.name}-${trainer.precision}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in VARIANTS:
        runs = {precision: rows(tmp_path / f"{variant}-{precision}") for precision in ("fp32", "bf16")}
        fp32, bf16 = ([r["loss"] for r in runs[p]] for p in ("fp32", "bf16"))
        assert bf16 != fp32, variant
        assert bf16 == pytest.approx(fp32, rel=1e-2), variant
        assert runs["bf16"][-1]["val_loss"] == pytest.approx(runs["fp32"][-1]["val_loss"], rel=1e-2), variant


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_gpu_logs_mfu_and_memory(tmp_path):
    proc = run_cli("train.py", *RUN, "trainer.device=cuda", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = rows(tmp_path)[-1]
    assert 0 < last["mfu"] < 1 and last["peak_memory_gib"] > 0
    assert rows(tmp_path)[-1]["loss"] < rows(tmp_path)[0]["loss"]
