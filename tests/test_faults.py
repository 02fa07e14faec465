"""Faults injected into real training runs (tiny model, tens of steps): nothing is lost, nothing is silently wrong.

Each fault's trials and outcomes are the table of docs/reliability.md. Kills are real SIGKILLs, at random steps
(seeded) or at a stage of a save (MEA_FAILPOINT, mea.train.checkpoint.failpoint); damage is done to the files
on disk; a full disk is a file-size limit (RLIMIT_FSIZE), which any user can set; a second writer is a live
process holding the lease.
"""
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mea.data.shards import prepared_path
from mea.config import load_config
from mea.run_directory import RunDirectory, damage

from .conftest import QUICK, ROOT, run_cli, started
from .test_trainer import curve, kill_when

ARGS = (*QUICK, "trainer.log_every=1", "trainer.max_steps=30", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=3", "trainer.eval_every=10")


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *ARGS, *extra, f"hydra.run.dir={run_dir}"]


def train(run_dir: Path, *extra: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory and its content hash, the lease's own files aside."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("lease.lock", "lease.json")}


def kill_at_step(run_dir: Path, step: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    with started(command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        kill_when(proc, lambda: metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines() if line.endswith("}")))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole")
    proc = train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def killed_after_step_20(tmp_path_factory) -> Path:
    """A run killed just after publishing step 20 (before pruning): checkpoints 5, 10, 15, 20."""
    run_dir = tmp_path_factory.mktemp("killed20")
    proc = train(run_dir, env={"MEA_FAILPOINT": "prune@20"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in RunDirectory(run_dir).checkpoints()][-2:] == ["step-0000015", "step-0000020"]
    return run_dir


def test_sigkill_at_random_steps_resumes_to_the_same_curve_bitwise(whole, tmp_path):
    steps = sorted(random.Random(31).sample(range(3, 29), 2))  # one before the first checkpoint, one between two
    for trial, step in enumerate(steps):
        run_dir = tmp_path / f"trial{trial}"
        kill_at_step(run_dir, step)
        assert not (run_dir / "summary.json").exists()
        resumed = train(run_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert curve(run_dir) == curve(whole), f"killed at step {step}"
        assert [c.name for c in RunDirectory(run_dir).checkpoints()] == ["step-0000020", "step-0000025", "step-0000030"]  # trainer.keep_checkpoints


def test_sigkill_at_each_stage_of_a_save_resumes_to_the_same_curve_bitwise(whole, tmp_path):
    """One run killed at each stage of a save in turn (the saves of steps 10, 15, 20, 25), each start resuming from
    what the kill before it left; then it trains to the end."""
    resumed_from = None
    for step, stage in ((10, "engine-files"), (15, "manifest"), (20, "rename"), (25, "prune")):
        killed = train(tmp_path, env={"MEA_FAILPOINT": f"{stage}@{step}"})
        assert killed.returncode == -signal.SIGKILL, (stage, killed.stderr[-3000:])
        assert resumed_from is None or f"resuming from {tmp_path}/checkpoints/{resumed_from}" in killed.stdout, stage
        resumed_from = RunDirectory(tmp_path).checkpoints()[-1].name
        assert resumed_from == f"step-{step if stage == 'prune' else step - 5:07d}", stage  # published only once sealed and renamed
    resumed = train(tmp_path)
    assert resumed.returncode == 0 and f"resuming from {tmp_path}/checkpoints/{resumed_from}" in resumed.stdout, resumed.stderr[-3000:]
    assert curve(tmp_path) == curve(whole)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated file": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "flipped byte": ("optimizer.pt", flip_a_byte, "does not match its hash"),
    "missing file": ("rng-rank0.pt", lambda p: p.unlink(), "rng-rank0.pt is missing"),
    "empty manifest": ("manifest.json", lambda p: p.write_text(""), "manifest.json is empty or unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_latest_checkpoint_is_passed_over_for_the_previous_verified_one(kind, killed_after_step_20, whole, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_after_step_20, run_dir)
    name, harm, reason = DAMAGE[kind]
    harm(run_dir / "checkpoints" / "step-0000020" / name)
    assert reason in damage(run_dir / "checkpoints" / "step-0000020")
    resumed = train(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = [line for line in resumed.stdout.splitlines() if line.startswith("warning: checkpoint step-0000020")]
    assert len(warning) == 1 and reason in warning[0] and name in warning[0]
    assert f"resuming from {run_dir}/checkpoints/step-0000015 at step 15" in resumed.stdout
    assert curve(run_dir) == curve(whole)
    assert (run_dir / "checkpoints" / "damaged-step-0000020").is_dir()  # kept aside for a look, never loaded


def limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_during_a_save_fails_in_one_line_and_keeps_the_previous_checkpoint(whole, tmp_path):
    killed = train(tmp_path, env={"MEA_FAILPOINT": "prune@10"})
    assert killed.returncode == -signal.SIGKILL
    before = snapshot(tmp_path / "checkpoints" / "step-0000010")
    model_bytes = (tmp_path / "checkpoints" / "step-0000010" / "model.safetensors").stat().st_size
    full = subprocess.run(command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(model_bytes // 2))
    error = one_line_error(full)
    assert "could not write checkpoint step-0000015" in error and "step-0000010 is intact" in error and "free disk space" in error
    assert snapshot(tmp_path / "checkpoints" / "step-0000010") == before and damage(tmp_path / "checkpoints" / "step-0000010") is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005", "step-0000010"]  # no half-written folder left
    resumed = train(tmp_path)  # room again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curve(tmp_path) == curve(whole)


def test_a_second_writer_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
    with started(command(tmp_path, "trainer.max_steps=100000", "trainer.checkpoint_every=0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as live:
        while not (tmp_path / "metrics.jsonl").is_file():
            assert live.poll() is None
            time.sleep(0.05)
        second = train(tmp_path, "trainer.max_steps=100000", "trainer.checkpoint_every=0")
        error = one_line_error(second)
        assert f"is being trained by pid {live.pid} on {socket.gethostname()}" in error
        assert live.poll() is None  # the holder trains on
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=120)
    assert not (tmp_path / "lease.json").exists()  # released when the holder ended


def test_a_requeued_job_waits_for_its_earlier_allocation_to_save_and_release(tmp_path):
    """SLURM keeps a job's id across a requeue: a start under the id of the lease's live holder waits for it (never
    trains beside it), then resumes from what it saved."""
    slurm_job = {"SLURM_JOB_ID": "77"}
    longer = ("trainer.max_steps=150", "trainer.checkpoint_every=0")
    with started(command(tmp_path, *longer), env={**os.environ, **slurm_job}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as earlier:
        while not (tmp_path / "metrics.jsonl").is_file():
            assert earlier.poll() is None
            time.sleep(0.05)
        with started(command(tmp_path, *longer), env={**os.environ, **slurm_job}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as requeued:
            while not (tmp_path / "lease.json").is_file() or not requeued.stdout.readline().startswith("waiting for the earlier allocation of SLURM job 77"):
                assert requeued.poll() is None, requeued.communicate()
            assert earlier.poll() is None and len(RunDirectory(tmp_path).checkpoints()) == 0  # it waits: nothing written beside the holder
            earlier.send_signal(signal.SIGTERM)  # what SLURM sends the earlier allocation
            out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, err[-3000:]
    assert "resuming from" in out and json.loads((tmp_path / "summary.json").read_text())["steps"] == 150


def test_stale_leases_are_taken_over_and_logged(whole, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for holder, said in [({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}, "its process is gone"),
                         ({"host": "node-that-left", "pid": 4242, "heartbeat": time.time() - 3600}, "no heartbeat for 36")]:
        run_dir = tmp_path / holder["host"]
        run_dir.mkdir()
        (run_dir / "lease.json").write_text(json.dumps(holder))
        proc = train(run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"taking over the lease of pid {holder['pid']} on {holder['host']} ({said}" in proc.stdout
        assert curve(run_dir) == curve(whole)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "lease.json").write_text(json.dumps({"host": "node-still-there", "pid": 4242, "slurm_job": "77", "heartbeat": time.time()}))
    error = one_line_error(train(fresh))
    assert "is being trained by pid 4242 on node-still-there (SLURM job 77)" in error and not (fresh / "metrics.jsonl").exists()


def test_another_identity_is_refused_finished_or_not_and_changes_nothing(whole, killed_after_step_20, tmp_path):
    for source in (whole, killed_after_step_20):
        run_dir = tmp_path / source.name
        shutil.copytree(source, run_dir)
        before = snapshot(run_dir)
        error = one_line_error(train(run_dir, "trainer.seed=1", "optim.lr=0.01"))
        assert f"{run_dir} holds another run (optim.lr: 0.003 recorded, 0.01 now, trainer.seed: 0 recorded, 1 now)" in error
        assert "trainer.amend=[optim.lr,trainer.seed]" in error
        assert snapshot(run_dir) == before


def test_an_amendment_is_recorded_and_shown_by_compare(killed_after_step_20, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_after_step_20, run_dir)
    proc = train(run_dir, "optim.lr=0.01", "trainer.amend=[optim.lr]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (amendment,) = RunDirectory(run_dir).amendments()
    assert amendment["step"] == 20 and amendment["changes"] == {"optim.lr": [0.003, 0.01]}
    assert RunDirectory(run_dir).identity()["optim.lr"] == 0.01 and load_config(run_dir / "config.yaml").optim.lr == 0.01
    assert train(run_dir, "optim.lr=0.01").returncode == 0  # the amended identity is the run's own from now on
    compare = run_cli("-m", "mea.tools.compare", str(run_dir), "--out", str(tmp_path / "report"))
    assert compare.returncode == 0, compare.stderr
    assert f"{run_dir} was amended at step 20 (optim.lr: 0.003 recorded, 0.01 now)" in (tmp_path / "report" / "report.md").read_text()
    finished = one_line_error(train(run_dir, "optim.lr=0.02", "trainer.amend=[optim.lr]"))
    assert "is finished; amending optim.lr changes nothing it trained" in finished


def test_a_longer_run_needs_an_amendment_where_the_schedule_depends_on_its_length(whole, tmp_path):
    cosine = tmp_path / "cosine"
    shutil.copytree(whole, cosine)
    error = one_line_error(train(cosine, "trainer.max_steps=40"))
    assert "trainer.max_steps: 30 recorded, 40 now" in error
    constant = tmp_path / "constant"
    assert train(constant, "scheduler=constant").returncode == 0
    longer = train(constant, "scheduler=constant", "trainer.max_steps=40")
    assert longer.returncode == 0 and json.loads((constant / "summary.json").read_text())["steps"] == 40, longer.stderr[-3000:]
    assert RunDirectory(constant).amendments()[0]["changes"] == {"trainer.max_steps": [30, 40]}


def test_a_run_directory_made_before_identities_takes_its_identity_from_its_config(whole, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(whole, run_dir)
    (run_dir / "identity.json").unlink()
    assert RunDirectory(run_dir).identity()["data.corpus"] == json.loads((whole / "summary.json").read_text())["data"]
    assert "is already done (30 steps)" in train(run_dir).stdout
    assert "trainer.seed: 0 recorded, 1 now" in one_line_error(train(run_dir, "trainer.seed=1"))


@pytest.mark.parametrize("amend, message", [
    ("[optim.lrr]", "trainer.amend names optim.lrr, which is not a config key"),
    ("[trainer.log_every]", "trainer.amend names trainer.log_every, which does not decide what the run computes"),
])
def test_bad_amendments_fail_before_any_compute(amend, message, tmp_path):
    error = one_line_error(train(tmp_path / "run", f"trainer.amend={amend}"))
    assert message in error and not (tmp_path / "run" / "identity.json").exists() and not (tmp_path / "run" / "lease.lock").exists()


def test_a_damaged_prepared_shard_is_refused_before_any_token_is_read(whole, tmp_path):
    cache = tmp_path / "cache"
    key = json.loads((whole / "summary.json").read_text())["data"]
    corpus = prepared_path(load_config(whole / "config.yaml").data, key)
    shutil.copytree(corpus, cache / "data" / key)
    flip_a_byte(cache / "data" / key / "train-00000.bin")
    error = one_line_error(train(tmp_path / "run", env={"MEA_CACHE": str(cache)}))
    assert "train-00000.bin does not match its checksum" in error and "prepare again" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "identity.json").exists()
