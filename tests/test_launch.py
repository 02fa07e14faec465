"""Cluster launch: rendered scripts line by line, a real two-node torchrun on one machine, bad shapes and ports."""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mea.run_directory import RunDirectory
from mea.train import checkpoint
from mea.distributed import free_port

from .conftest import QUICK, ROOT, run_cli, run_tool, started
from .test_trainer import RUN, assert_curves_close, rows

LAUNCH = "launch/launch.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_cpu_processes_ask_slurm_for_no_gpus(tmp_path):
    """--gpus-per-node N with DS_ACCELERATOR=cpu (the documented form) and its new name --procs-per-node: N
    processes a node, and no GPU asked of a cluster that may have none."""
    for option in ("--gpus-per-node", "--procs-per-node"):
        proc = run_tool("mea.tools.launch", "slurm", "--nodes", "2", option, "2", "--env", "DS_ACCELERATOR=cpu", "--run-dir", str(tmp_path), "--dry-run", "--",
                       "deepspeed=zero1", "trainer.global_batch=16")
        assert proc.returncode == 0, proc.stderr
        assert "--gpus-per-node" not in proc.stdout and "--nproc_per_node=2" in proc.stdout


def test_slurm_script_for_eight_nodes(tmp_path):
    proc = run_tool("mea.tools.launch", "slurm", "--nodes", "8", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--time", "12:00:00",
                   "--qos", "high", "--constraint", "h100", "--job-name", "exp1", "--env", "NCCL_IB_DISABLE=0", "--run-dir", str(tmp_path), "--dry-run", "--",
                   "model=350m", "deepspeed=zero2", "trainer.global_batch=512", "trainer.micro_batch=8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=exp1",
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=12:00:00",
        f"#SBATCH --output={tmp_path}/logs/%x-%j.out",
        f"#SBATCH --error={tmp_path}/logs/%x-%j.err",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
    ]
    assert 'export MASTER_ADDR=$(scontrol show node "$first_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")' in lines
    assert "export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}" in lines and "export NCCL_IB_DISABLE=0" in lines  # jobs sharing a node: a port each
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun == (  # the c10d rendezvous numbers the nodes; torchrun by its path, as a job's shell has no activated environment
        f"srun --kill-on-bad-exit=1 {TORCHRUN} --nnodes=8 --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID "
        f"--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT {ROOT}/train.py model=350m deepspeed=zero2 "
        f"trainer.global_batch=512 trainer.micro_batch=8 hydra.run.dir={tmp_path} &"
    )
    assert "trap save_and_requeue USR1" in lines and '    scancel --signal=TERM "$SLURM_JOB_ID"' in lines
    assert not (tmp_path / "launch").exists()  # a dry run writes nothing


def test_torchrun_commands_one_per_node(tmp_path):
    proc = run_tool("mea.tools.launch", "torchrun", "--nodes", "2", "--gpus-per-node", "4", "--master-addr", "10.0.0.1", "--master-port", "29400",
                   "--run-dir", str(tmp_path), "--job-name", "j", "--", "deepspeed=zero1", "trainer.global_batch=16")
    assert proc.returncode == 0, proc.stderr
    script = (tmp_path / "launch" / "torchrun.sh").read_text().splitlines()
    for rank in (0, 1):
        assert script[2 + rank] == (
            f"{TORCHRUN} --nnodes=2 --nproc_per_node=4 --node_rank={rank} --rdzv_id=j --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29400 "
            f"{ROOT}/train.py deepspeed=zero1 trainer.global_batch=16 hydra.run.dir={tmp_path}"
        )
    assert "deepspeed:\n  enabled: true\n  stage: 1" in (tmp_path / "launch" / "config.yaml").read_text()


def test_deepspeed_launcher_hostfile_and_command(tmp_path):
    proc = run_tool("mea.tools.launch", "deepspeed", "--hosts", "gpu-a,gpu-b", "--gpus-per-node", "8", "--run-dir", str(tmp_path), "--dry-run", "--",
                   "deepspeed=zero3", "trainer.global_batch=64")
    assert proc.returncode == 0, proc.stderr
    assert "gpu-a slots=8\ngpu-b slots=8\n" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        f"deepspeed --hostfile={tmp_path}/launch/hostfile --num_nodes=2 --num_gpus=8 --master_addr=gpu-a --master_port=29500 "
        f"--no_local_rank {ROOT}/train.py deepspeed=zero3 trainer.global_batch=64 hydra.run.dir={tmp_path}"
    )


def test_bad_shapes_missing_tools_and_busy_ports(tmp_path):
    shape = run_tool("mea.tools.launch", "slurm", "--nodes", "3", "--gpus-per-node", "8", "--run-dir", str(tmp_path), "--dry-run", "--", "deepspeed=zero2", "trainer.global_batch=64")
    assert shape.returncode == 2 and "24 ranks cannot split the batch: trainer.global_batch=64 is not a multiple of trainer.micro_batch=2 × world size 24" in shape.stderr
    no_ds = run_tool("mea.tools.launch", "torchrun", "--nodes", "2", "--run-dir", str(tmp_path), "--dry-run", "--", "trainer.global_batch=16")
    assert no_ds.returncode == 2 and "add deepspeed=zero1" in no_ds.stderr
    empty_bin = tmp_path / "empty-bin"  # a PATH without sbatch, whatever this machine has installed (Debian's is /usr/bin/sbatch)
    empty_bin.mkdir()
    no_sbatch = run_tool("mea.tools.launch", "slurm", "--nodes", "2", "--run-dir", str(tmp_path), "--", "deepspeed=zero2", "trainer.global_batch=16", env={"PATH": str(empty_bin)})
    assert no_sbatch.returncode == 2 and "sbatch is not on the PATH" in no_sbatch.stderr and "--dry-run" in no_sbatch.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_tool("mea.tools.launch", "torchrun", "--nodes", "2", "--node-rank", "0", "--master-port", str(port), "--run-dir", str(tmp_path), "--", "deepspeed=zero2", "trainer.global_batch=16")
    assert taken.returncode == 2 and f"port {port} is in use on 127.0.0.1; pass another --master-port" in taken.stderr
    for proc in (shape, no_ds, no_sbatch, taken):
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "metrics.jsonl").exists()


def node(rank: int, port: int, run_dir, *extra: str):
    args = [sys.executable, LAUNCH, "torchrun", "--nodes", "2", "--gpus-per-node", "1", "--master-port", str(port), "--node-rank", str(rank),
            "--run-dir", str(run_dir), "--", *RUN, "deepspeed=zero2", *extra]
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
    return started(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_on_one_machine_match_one_process(tmp_path):
    single = tmp_path / "single"
    assert run_cli("train.py", *RUN, f"hydra.run.dir={single}").returncode == 0
    port = free_port()
    with node(0, port, tmp_path / "two") as first, node(1, port, tmp_path / "two") as second:
        nodes = [first, second]
        outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    assert "2 process(es)" in outs[0][0] + outs[1][0]
    assert_curves_close(single, tmp_path / "two", rel=1e-4)


def test_sigterm_to_torchrun_checkpoints_and_the_same_command_resumes(tmp_path):
    args = [*QUICK, "trainer.max_steps=200", "deepspeed=zero2"]
    port = free_port()
    cmd = [sys.executable, LAUNCH, "torchrun", "--nodes", "1", "--gpus-per-node", "2", "--master-port", str(port), "--node-rank", "0", "--run-dir", str(tmp_path), "--", *args]
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
    with started(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert proc.poll() is None
            time.sleep(0.05)
        (agent,) = [p for p in psutil.Process(proc.pid).children() if "torchrun" in " ".join(p.cmdline())]
        agent.send_signal(signal.SIGTERM)  # what srun forwards on preemption
        out, _ = proc.communicate(timeout=300)
    assert "stop signal: saved" in out, out[-3000:]
    (saved,) = RunDirectory(tmp_path).checkpoints()
    step = checkpoint.read_state(saved)["step"]
    assert 5 <= step < 200
    args[args.index("trainer.max_steps=200")] = f"trainer.max_steps={step + 10}"  # a shorter run: an amendment, recorded
    resumed = subprocess.run([*cmd[: cmd.index("--") + 1], *args, "trainer.amend=[trainer.max_steps]"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert rows(tmp_path)[-1]["step"] == step + 10
    assert RunDirectory(tmp_path).amendments()[0]["changes"] == {"trainer.max_steps": [200, step + 10]}


def test_slurm_launcher_config_composes():
    proc = run_cli("train.py", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p", "hydra.launcher")
    assert proc.returncode == 0, proc.stderr
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: gpu" in proc.stdout and "max_num_timeout: 5" in proc.stdout
