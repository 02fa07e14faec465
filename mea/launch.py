"""`mea-launch` / `launch/launch.py`: start a training run on a cluster from one command.

    mea-launch slurm     --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 --run-dir /shared/runs/exp1 -- model=1.3b deepspeed=zero2
    mea-launch torchrun  --nodes 2 --gpus-per-node 8 --master-addr node0 --node-rank 0 --run-dir /shared/runs/exp1 -- model=350m
    mea-launch deepspeed --hosts node0,node1 --gpus-per-node 8 --run-dir /shared/runs/exp1 -- model=350m deepspeed=zero3

The engines are torchrun (c10d rendezvous on the first node) and DeepSpeed's launcher; SLURM's `srun` starts one
torchrun per node. The command checks the shape against the batch settings, writes the rendered script and the
resolved config into `<run-dir>/launch/`, then submits or runs it; `--dry-run` only prints.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from mea.config import ConfigError, compose_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"


class LaunchError(ValueError):
    """A launch that cannot work; one line that says what to change."""


@dataclass
class Shape:
    nodes: int
    gpus_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def train_args(overrides: list[str], run_dir: str) -> list[str]:
    return [str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]


def check_batch(overrides: list[str], shape: Shape, run_dir: str):
    """Compose the training config as train.py will, and refuse a shape its batch settings cannot split."""
    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    cfg.run_dir = run_dir
    tc = cfg.trainer
    global_batch = tc.global_batch_tokens // cfg.data.seq_len if tc.global_batch_tokens else tc.global_batch
    micro = tc.micro_batch or global_batch // shape.world_size
    if micro < 1 or global_batch % (micro * shape.world_size):
        raise LaunchError(
            f"{shape.nodes} nodes × {shape.gpus_per_node} GPUs = {shape.world_size} ranks cannot split a global batch of {global_batch} sequences"
            f" into micro batches of {tc.micro_batch or micro}; make trainer.global_batch a multiple of micro_batch × {shape.world_size}"
        )
    if shape.world_size > 1 and not cfg.deepspeed.enabled:
        raise LaunchError(f"{shape.world_size} ranks need DeepSpeed; add deepspeed=zero1 (or zero0/zero2/zero3) to the overrides")
    return cfg


def torchrun_command(shape: Shape, node_rank: int | str, endpoint: str, overrides: list[str], run_dir: str, rdzv_id: str) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={shape.nodes}",
        f"--nproc_per_node={shape.gpus_per_node}",
        f"--node_rank={node_rank}",
        f"--rdzv_id={rdzv_id}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        *train_args(overrides, run_dir),
    ]


def render_sbatch(args: argparse.Namespace, shape: Shape, overrides: list[str], run_dir: str) -> str:
    logs = Path(run_dir) / "logs"
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={shape.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU workers
        f"--gpus-per-node={shape.gpus_per_node}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={args.time}",
        f"--output={logs}/%x-%j.out",
        f"--error={logs}/%x-%j.err",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",  # warning before the time limit or preemption: checkpoint, then requeue
    ]
    if args.partition:
        directives.append(f"--partition={args.partition}")
    if args.account:
        directives.append(f"--account={args.account}")
    torchrun = torchrun_command(shape, "$SLURM_NODEID", "$MASTER_ADDR:$MASTER_PORT", overrides, run_dir, "$SLURM_JOB_ID")
    body = [
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(logs))}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=${{MASTER_PORT:-{shape.master_port}}}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        *[f"export {line}" for line in args.env],
        f"cd {shlex.quote(str(ROOT))}",
        "# USR1 (sent before the limit): the trainer saves a checkpoint on SIGTERM and exits; the job requeues and resumes.",
        "on_usr1() { kill -TERM \"$SRUN_PID\"; wait \"$SRUN_PID\" || true; scontrol requeue \"$SLURM_JOB_ID\"; }",
        "trap on_usr1 USR1",
        "srun --kill-on-bad-exit=1 " + " ".join(quote(p) for p in torchrun) + " &",
        "SRUN_PID=$!",
        'wait "$SRUN_PID"',
    ]
    return "#!/bin/bash\n" + "".join(f"#SBATCH {d}\n" for d in directives) + "\n" + "\n".join(body) + "\n"


def quote(part: str) -> str:
    """Shell-quote, leaving $VARIABLES for the shell that runs the script to expand."""
    return part if "$" in part and " " not in part else shlex.quote(part)


def hostfile(hosts: list[str], gpus_per_node: int) -> str:
    return "".join(f"{host} slots={gpus_per_node}\n" for host in hosts)


def deepspeed_command(shape: Shape, hostfile_path: Path, overrides: list[str], run_dir: str) -> list[str]:
    return [
        "deepspeed",
        f"--hostfile={hostfile_path}",
        f"--num_nodes={shape.nodes}",
        f"--num_gpus={shape.gpus_per_node}",
        f"--master_addr={shape.master_addr}",
        f"--master_port={shape.master_port}",
        "--no_local_rank",  # train.py is a Hydra app: ranks come from the environment, not from --local_rank
        *train_args(overrides, run_dir),
    ]


def port_free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, port))
            return True
        except OSError:
            return False


def find_tool(name: str) -> str | None:
    """The tool of the running Python environment first (torchrun and deepspeed install beside it), else the PATH's."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.is_file() else shutil.which(name)


def is_local(addr: str) -> bool:
    return addr in ("127.0.0.1", "localhost", socket.gethostname(), "0.0.0.0")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mea-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backend", choices=["slurm", "torchrun", "deepspeed"])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="processes per node (GPUs, or CPU processes with DS_ACCELERATOR=cpu)")
    parser.add_argument("--run-dir", required=True, help="the run directory, on storage every node sees")
    parser.add_argument("--master-addr", default="127.0.0.1", help="torchrun/deepspeed: the first node's address")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--node-rank", type=int, help="torchrun: run this node's command here (else print every node's)")
    parser.add_argument("--hosts", help="deepspeed: comma-separated hosts, the first is the master (default: this machine)")
    parser.add_argument("--job-name", default="mea")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--cpus-per-task", type=int, default=16)
    parser.add_argument("--signal-seconds", type=int, default=120, help="slurm: USR1 this long before the time limit")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="slurm: exported in the job (NCCL settings, caches)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written and run; change nothing")
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1 :]
    return parser.parse_args(argv), []


def launch(argv: list[str]) -> int:
    args, overrides = parse(argv)
    hosts = args.hosts.split(",") if args.hosts else None
    nodes = len(hosts) if hosts else args.nodes
    master = hosts[0] if hosts and args.master_addr == "127.0.0.1" else args.master_addr
    shape = Shape(nodes, args.gpus_per_node, master, args.master_port)
    run_dir = str(Path(args.run_dir).absolute())
    cfg = check_batch(overrides, shape, run_dir)
    out = Path(run_dir) / "launch"

    if args.backend == "slurm":
        files = {"slurm.sbatch": render_sbatch(args, shape, overrides, run_dir)}
        command = ["sbatch", str(out / "slurm.sbatch")]
        tool = "sbatch"
    elif args.backend == "torchrun":
        endpoint = f"{shape.master_addr}:{shape.master_port}"
        per_node = [torchrun_command(shape, rank, endpoint, overrides, run_dir, args.job_name) for rank in range(nodes)]
        files = {"torchrun.sh": "#!/bin/bash\n# one line per node; run line i on node i\n" + "".join(shlex.join(c) + "\n" for c in per_node)}
        command = per_node[args.node_rank] if args.node_rank is not None else None
        tool = "torchrun"
    else:
        hosts = hosts or ["localhost"]
        files = {"hostfile": hostfile(hosts, shape.gpus_per_node)}
        command = deepspeed_command(shape, out / "hostfile", overrides, run_dir)
        files["deepspeed.sh"] = "#!/bin/bash\n" + shlex.join(command) + "\n"
        tool = "deepspeed"
    files["config.yaml"] = OmegaConf.to_yaml(cfg, resolve=False)

    if args.dry_run:
        for name, text in files.items():
            print(f"# --- {out / name}\n{text}")
        if command:
            print(shlex.join(command))
        return 0
    executable = find_tool(tool)
    if command and executable is None:
        raise LaunchError(f"{tool} is not on the PATH of this machine; install it (or activate the environment that has it), or add --dry-run to only render")
    if command and args.backend != "slurm" and is_local(shape.master_addr) and (args.node_rank in (None, 0)) and not port_free(shape.master_addr, shape.master_port):
        raise LaunchError(f"port {shape.master_port} is in use on {shape.master_addr}; pass another --master-port")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    if command is None:
        print(f"wrote {out / 'torchrun.sh'}; run line i on node i (or pass --node-rank i here):")
        print(files["torchrun.sh"])
        return 0
    print(shlex.join(command), flush=True)
    return subprocess.call([executable, *command[1:]], env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main() -> None:
    try:
        sys.exit(launch(sys.argv[1:]))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
