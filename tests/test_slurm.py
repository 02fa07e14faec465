"""Against a real SLURM: the two-node cluster of launch/local_slurm.sh (slurmctld, two slurmd of one CPU each),
brought up by this module's fixture and stopped by it, by pid, however the tests end. Jobs are submitted as a
user submits them, with `.venv/bin/mea-launch` and `mea-sweep` run from a PATH without the environment, and
followed with squeue/scontrol (no accounting daemon)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mea.run_directory import RunDirectory
from mea.train import checkpoint
from mea.distributed import free_port

from .conftest import QUICK, ROOT, kill_tree, run_cli, started
from .test_scaling import MINI
from .test_trainer import RUN, assert_curves_close, curve, rows

pytestmark = pytest.mark.slow  # `make test-slow`: 549 CPU-s of 2 cores' jobs, measured alone (Makefile)
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
BIN = Path(sys.executable).parent  # the environment's tools, called by their paths: nothing is activated
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"
CPU_JOB = ("--gpus-per-node", "1", "--env", "DS_ACCELERATOR=cpu", "--cpus-per-task", "1", "--time", "10:00", "--signal-seconds", "60")
LONG = (*QUICK, "trainer.max_steps=100", "trainer.checkpoint_every=1000", "deepspeed=zero1")  # saves only when stopped, and at the end
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF and a bare PATH for the local cluster, up for this module's tests."""
    missing = [tool for tool in TOOLS if shutil.which(tool, path=f"{os.environ['PATH']}:/usr/sbin:/sbin") is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root: slurmd starts each job as its user")
    folder = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run(["bash", "launch/local_slurm.sh", "up", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr + "".join(p.read_text()[-2000:] for p in (folder / "log").glob("*.log"))
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "PATH": BARE_PATH}
    finally:
        subprocess.run(["bash", "launch/local_slurm.sh", "down", str(folder)], cwd=ROOT, timeout=120)


def launch(env: dict, run_dir: Path, *args: str, overrides=LONG, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "mea-launch"), "slurm", "--nodes", "2", *CPU_JOB, "--master-port", str(free_port()), "--run-dir", str(run_dir), *args,
                           "--", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def job_id(proc: subprocess.CompletedProcess) -> str:
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job(env: dict, job: str) -> dict:
    """`scontrol show job`, as key → value."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def slurm(env: dict, *command: str) -> None:
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)


def wait_for(ready, what: str, env: dict, jobs: list[str], timeout: float = 300):
    """Until ready() is true. A requeued job is held until its BeginTime (about two minutes here); it is let start
    a few seconds after its requeue instead (at once, the nodes may still hold the earlier allocation's revoked
    credential and fail the start)."""
    deadline, hurried = time.time() + timeout, set()
    while not (value := ready()):
        for j in jobs:
            state = job(env, j)
            if state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime" and (j, state["Restarts"]) not in hurried:
                subprocess.run(["scontrol", "update", f"JobId={j}", "StartTime=now+2"], env=env, capture_output=True)
                hurried.add((j, state["Restarts"]))
        assert time.time() < deadline, f"timed out waiting for {what}: {[job(env, j) for j in jobs]}"
        time.sleep(0.5)  # each look at a job starts scontrol: polled faster, it takes CPU from the jobs it waits for
    return value


def ended(env: dict, j: str) -> dict:
    return wait_for(lambda: (state := job(env, j))["JobState"] in ENDED and state, f"job {j} to end", env, [j])


def log(run_dir: Path, j: str) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob(f"*-{j}.*")))


def saved_step(run_dir: Path) -> int:
    kept = RunDirectory(run_dir).checkpoints()
    return checkpoint.read_state(kept[-1])["step"] if kept else 0


def steps_past(run_dir: Path, step: int) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and any(r["step"] > step for r in rows(run_dir))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """LONG trained by two nodes of the cluster in one allocation."""
    run = tmp_path_factory.mktemp("uninterrupted")
    submitted = launch(cluster, run)
    assert ended(cluster, job_id(submitted))["JobState"] == "COMPLETED", log(run, job_id(submitted))[-3000:]
    return run


def test_two_nodes_match_one_process_under_zero1_and_zero3(cluster, tmp_path):
    jobs = {stage: job_id(launch(cluster, tmp_path / stage, overrides=(*RUN, f"deepspeed={stage}"))) for stage in ("zero1", "zero3")}
    assert run_cli("train.py", *RUN, f"hydra.run.dir={tmp_path / 'single'}").returncode == 0
    final = json.loads((tmp_path / "single" / "summary.json").read_text())["final_train_loss"]
    for stage, j in jobs.items():
        assert ended(cluster, j)["JobState"] == "COMPLETED", log(tmp_path / stage, j)[-3000:]
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["final_train_loss"] == pytest.approx(final, rel=1e-5), stage
        assert_curves_close(tmp_path / "single", tmp_path / stage, rel=1e-4)
    script = (tmp_path / "zero1" / "launch" / "slurm.sbatch").read_text()
    assert "--gpus-per-node" not in script and f"srun --kill-on-bad-exit=1 {BIN}/torchrun " in script  # CPU processes ask for no GPUs


def test_time_limit_preemption_and_scancel_each_checkpoint_and_the_run_goes_on_as_if_never_stopped(cluster, uninterrupted, tmp_path):
    """The time-limit warning (USR1 to the batch shell): saved, requeued by the job itself. Preemption (scontrol
    requeue: SIGTERM to the tasks): saved, requeued by SLURM. scancel: saved, not requeued; the same mea-launch
    command then finishes it. The losses equal the uninterrupted run's at every step, bitwise."""
    run = tmp_path / "run"
    j = job_id(launch(cluster, run))
    assert json.loads((run / "launch" / "job.json").read_text())["job"] == j  # where a driver finds the run's job again
    stops = [("time limit", ["scancel", "--signal=USR1", "--batch", j]), ("preemption", ["scontrol", "requeue", j]), ("scancel", ["scancel", j])]
    for restarts, (name, command) in enumerate(stops):
        resumed_at = saved_step(run)
        wait_for(lambda: steps_past(run, resumed_at), f"steps past {resumed_at} before the {name}", cluster, [j])
        slurm(cluster, *command)
        wait_for(lambda: saved_step(run) > resumed_at, f"the checkpoint of the {name}", cluster, [j])
        state = wait_for(lambda: (s := job(cluster, j))["JobState"] == "CANCELLED" or int(s["Restarts"]) > restarts and s, f"job {j} after the {name}", cluster, [j])
        assert int(job(cluster, j)["Restarts"]) == (restarts + 1 if name != "scancel" else restarts), state
    assert ended(cluster, j)["JobState"] == "CANCELLED" and not (run / "summary.json").exists()
    text = log(run, j)
    assert text.count("stop signal: saved") == 3 and text.count("resuming from") == 2, text[-3000:]
    again = job_id(launch(cluster, run))
    assert ended(cluster, again)["JobState"] == "COMPLETED" and "resuming from" in log(run, again)
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(5, 101, 5))  # no gap, no repeated step
    assert curve(run) == curve(uninterrupted)


def test_a_refused_submission_prints_slurms_reason_and_leaves_the_run_directory_as_it_was(cluster, tmp_path):
    for refused, reason in ((("--partition", "gpu-a100"), "invalid partition"), (("--nodes", "4"), "more processors requested than permitted")):
        proc = launch(cluster, tmp_path / "run", *refused, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error: sbatch refused the job: ") and reason in line.lower(), line
        assert not (tmp_path / "run").exists()


def test_smoke_check_reports_each_check_on_the_cluster(cluster, tmp_path):
    proc = launch(cluster, tmp_path / "check", "--smoke", overrides=(*QUICK, "deepspeed=zero1"))
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["PASS rendezvous", "PASS run directory", "PASS all-reduce", "PASS first losses"], proc.stdout
    assert "2 of 2 ranks on 2 node(s) (n1, n2)" in lines[0] and "GB/s" in lines[2] and "spread across ranks 0.00e+00" in lines[3]


# test_scaling's two-size sweep, its first size trained long enough (300 steps) to be signalled mid-run, saving only when stopped
SWEEP = (MINI.replace("name: mini", "name: arrays").replace("name: w32, tokens: 6144", "name: w32, tokens: 76800")
         .replace("trainer.log_every=4", "trainer.log_every=10").replace("scheduler.warmup_steps=2]", "scheduler.warmup_steps=2, trainer.checkpoint_every=1000]"))
ARRAY = ("hydra.launcher.partition=cpu", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=10")


def test_a_sweep_runs_as_job_arrays_and_a_task_warned_of_its_time_limit_resumes(cluster, tmp_path):
    """Both sizes' arrays queued at once; submitit's warning (USR2) to one array task: the trainer saves, submitit
    requeues the task, and it resumes from that checkpoint; results.csv follows."""
    spec = tmp_path / "arrays.yaml"
    out = tmp_path / "out"
    spec.write_text(SWEEP.replace("OUT", str(out)))
    with started([str(BIN / "mea-sweep"), str(spec), "--slurm", "--", *ARRAY], env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sweep:
        lease = wait_for(lambda: next((p for p in out.glob("w32/mea/*/lease.json") if steps_past(p.parent, 0)), None), "a task training", cluster, [])
        run = lease.parent
        task = json.loads(lease.read_text())["slurm_job"]
        # slurmctld can deliver the signal yet answer "Job can not be altered now" (seen with a second array queued),
        # and scancel then retries every 5+ s, which would signal the requeued task again: it stops once the task has it
        signalling = subprocess.Popen(["scancel", "--signal=USR2", task], env=cluster, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: any("Caught signal SIGUSR2" in p.read_text() for p in out.glob("w32/.submitit/*/*_log.out")),
                     "the task to have USR2", cluster, [task], timeout=120)
        finally:
            signalling.kill()
        # both sizes' arrays are in the queue at once: w64's is there while w32's requeued task is still to finish
        wait_for(lambda: any(out.glob("w64/.submitit/*/*_submitted.pkl")) or (run / "summary.json").exists(), "w64's array", cluster, [task])
        assert any(out.glob("w64/.submitit/*/*_submitted.pkl")) and not (run / "summary.json").exists()
        wait_for(lambda: sweep.poll() is not None, "the sweep", cluster, [task], timeout=600)
        printed = sweep.stdout.read()
    assert sweep.returncode == 0, printed[-3000:]
    (task_log,) = [text for p in out.glob("w32/.submitit/*/*_log.out") if f"run directory: {run}\n" in (text := p.read_text())]
    for said in ("stop signal: saved", "Requeued job", f"resuming from {run}/checkpoints/step-"):  # the trainer saved, submitit requeued
        assert said in task_log, task_log[-3000:]
    steps = [r["step"] for r in rows(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 300
    results = (out / "results.csv").read_text().splitlines()
    assert len(results) == 7  # a fit from arrays' results: the --slurm sitting's test below


# The protocol at its smallest with the stages that submit jobs: arrays for the sweep; jobs for the target, a bracket
# and compression's recoveries (a second corpus's runs and init checks are jobs as the target's are)
NANO = """
name: nano
out: {out}/runs
report: {out}/results/nano.md
baseline: mha
sweep:
  arms: {{mha: [attention=mha], mea: [attention=mea]}}
  sizes:
    - {{model: tiny, name: w32, tokens: 4096, overrides: [model.dim=32, model.n_heads=4]}}
    - {{model: tiny, name: w64, tokens: 4096, overrides: [model.dim=64, model.n_heads=4]}}
  lr_min: 1.0e-3
  lr_max: 1.0e-1
  lr_points: 3
  overrides: [data=tinyshakespeare, data.source={shakespeare}, data.vocab_size=512, data.seq_len=32, trainer.global_batch=8, logger.mode=disabled,
              trainer.log_every=4, trainer.eval_batches=1, trainer.sample_tokens=4, scheduler.warmup_steps=2, model.n_layers=2]
target: {{model: tiny, name: w96, tokens: 2048, overrides: [model.dim=96, model.n_heads=4], seeds: [0]}}
lr_bracket: {{factors: [0.5, 1, 2], arms: [mea]}}
compression: {{arm: mea, kv_heads: [2], layer_sets: {{all: all}}, recover_share: 0.25}}
"""


def our_jobs(env: dict, *states: str) -> dict[str, str]:
    """Name → job id (an array's own id) of every job in the queue, or of those in these states."""
    listed = subprocess.run(["squeue", "-h", "-o", "%j %F", *(["-t", ",".join(states)] if states else [])], env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in listed.splitlines())


def held_then_driver_killed(env: dict, driver: subprocess.Popen, prefix: str) -> list[str]:
    """Once a job named prefix* waits in the queue: every waiting job held (so that it is still there when the
    driver starts again, however fast the cluster), then the driver killed with all it started, as a lost login
    session is."""
    wait_for(lambda: driver.poll() is None and any(name.startswith(prefix) for name in our_jobs(env, "PENDING")), f"a job {prefix}* waiting", env, [])
    held = sorted(set(our_jobs(env, "PENDING").values()))
    slurm(env, "scontrol", "hold", *held)
    kill_tree(driver)
    return held


def release(env: dict, held: list[str]) -> None:
    """Let the held jobs go (scontrol says "already finished" for an array's tasks that ran, and exits 1: read
    the queue instead)."""
    subprocess.run(["scontrol", "release", *held], env=env, capture_output=True, timeout=60)
    reasons = subprocess.run(["squeue", "-h", "-t", "PENDING", "-o", "%r"], env=env, capture_output=True, text=True, check=True).stdout
    assert "JobHeld" not in reasons, reasons


def without_where_and_how_long(report: str, out: Path) -> str:
    """The report with its sitting's folder named OUT, less what says where it ran and how long or fast: the
    header's machine and times, and the columns of tokens/s and decode ms/token."""
    kept, timed, in_table = [], set(), False
    for line in report.replace(str(out), "OUT").splitlines():
        if line.startswith(("Made by `mea-experiment`", "wall time of this sitting")):
            continue
        if line.startswith("|"):
            cells = line.split("|")
            if not in_table:
                timed = {i for i, cell in enumerate(cells) if "tokens/s" in cell or "ms/token" in cell}
            line = "|".join("…" if i in timed and in_table else cell for i, cell in enumerate(cells))
        in_table = line.startswith("|")
        kept.append(line)
    return "\n".join(kept)


@pytest.mark.timeout(900)
def test_the_protocol_on_slurm_killed_twice_and_started_again_reports_what_a_local_sitting_reports(cluster, tmp_path, shakespeare):
    """Every stage as jobs, the corpus prepared once by a prepare job; the driver killed while the sweep's arrays
    are queued and again while the target's jobs are, each time started again with the same command: it follows
    the jobs in the queue, submits none twice, trains no run twice, and its report is the local sitting's but for
    where and how long it ran."""
    for where in ("local", "slurm"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "nano.yaml").write_text(NANO.format(out=tmp_path / where, shakespeare=shakespeare))
    local = run_cli("-m", "mea.studies.experiment", str(tmp_path / "local" / "nano.yaml"), timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]

    out = tmp_path / "slurm" / "runs"
    env = {**cluster, "MEA_CACHE": str(tmp_path / "cache")}  # a cache of its own: every corpus is prepared by a job here
    printed = tmp_path / "driver.log"  # a file, not a pipe: nothing blocks on a driver's output once it is killed
    with open(printed, "a") as log_file:
        def driver():
            return started([str(BIN / "mea-experiment"), str(tmp_path / "slurm" / "nano.yaml"), "--slurm", "--poll-seconds", "1", "--", *ARRAY],
                           env=env, stdout=log_file, stderr=subprocess.STDOUT)

        def follows(first_driver, said: str) -> None:
            wait_for(lambda: said in printed.read_text() or first_driver.poll() is not None, f"the driver to say {said!r}", env, [])
            assert said in printed.read_text(), printed.read_text()[-3000:]

        with driver() as first:
            held = held_then_driver_killed(env, first, "nano.sweep.")
        with driver() as second:
            follows(second, "its array nano.sweep.")
            release(env, held)
            held = held_then_driver_killed(env, second, "nano.compare-main.")
        with driver() as third:
            follows(third, "its job nano.")
            release(env, held)
            assert third.wait(timeout=600) == 0, printed.read_text()[-3000:]

    sweep_runs = sorted(out.glob("sweep/*/*/lr*"))
    assert len(sweep_runs) == 12 and all((run / "summary.json").is_file() for run in sweep_runs)
    for size in ("w32", "w64"):  # one array task a run: submitit's folder per task, <array>_<task>
        assert len([task for task in (out / "sweep" / size / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", task.name)]) == 6
    jobs = [run for run in out.rglob("launch/job.json") if "prepare" not in run.parts]
    assert sorted(str(j.parent.parent.relative_to(out)) for j in jobs) == [
        "compare-main/mea/s0", "compare-main/mha/s0", "compression/kv2-all-recover",
        "compression/uncompressed-recover", "lr-bracket/mea/x0.5", "lr-bracket/mea/x2"]
    for job_file in jobs:  # one job a run, its log appended to by no second one
        logs = {p.stem.rsplit("-", 1)[1] for p in (job_file.parent.parent / "logs").glob("*.out")}
        assert logs == {str(json.loads(job_file.read_text())["job"])}, (job_file, logs)
    prepared = sorted(p.name for p in (out / "prepare").iterdir())
    assert len(prepared) == 1 and all(len(list((out / "prepare" / corpus / "logs").glob("*.out"))) == 1 for corpus in prepared)
    read = {(tmp_path / "cache" / "data" / json.loads(s.read_text())["data"]).resolve().name for s in out.rglob("summary.json")}  # a recovery: the link
    assert read == set(prepared) and all((tmp_path / "cache" / "data" / corpus / "manifest.json").is_file() for corpus in prepared)  # of its tokenizer's file
    reports = {where: without_where_and_how_long((tmp_path / where / "results" / "nano.md").read_text(), tmp_path / where) for where in ("local", "slurm")}
    assert reports["slurm"] == reports["local"]


def test_a_stage_shape_the_cluster_refuses_stops_the_sitting_with_slurms_reason_before_any_job(cluster, tmp_path, shakespeare):
    spec = tmp_path / "nano.yaml"
    spec.write_text(NANO.format(out=tmp_path, shakespeare=shakespeare).replace("name: nano", "name: refused") + "resources: {target: {nodes: 4, gpus_per_node: 1, deepspeed: zero1}}\n")
    proc = subprocess.run([str(BIN / "mea-experiment"), str(spec), "--slurm", "--", *ARRAY], cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: resources.target: SLURM refuses 4 node(s) × 1 GPU(s) a run: ") and "more processors requested than permitted" in line.lower(), line
    assert not (tmp_path / "runs").exists() and not [name for name in our_jobs(cluster) if name.startswith("refused.")]  # not even its prepare job
