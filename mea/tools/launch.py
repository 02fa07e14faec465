"""`mea-launch` / `launch/launch.py`: start a training run on a cluster from one command.

    mea-launch slurm     --nodes 8 --gpus-per-node 8 --partition gpu --time 24:00:00 --run-dir /shared/runs/exp1 -- model=1.3b deepspeed=zero2
    mea-launch slurm     --smoke --nodes 8 --gpus-per-node 8 --partition gpu --run-dir /shared/runs/check -- model=1.3b deepspeed=zero2
    mea-launch torchrun  --nodes 2 --gpus-per-node 8 --master-addr node0 --node-rank 0 --run-dir /shared/runs/exp1 -- model=350m
    mea-launch deepspeed --hosts node0,node1 --gpus-per-node 8 --run-dir /shared/runs/exp1 -- model=350m deepspeed=zero3

The engines are torchrun (c10d rendezvous on the first node) and DeepSpeed's launcher; SLURM's `srun` starts one
torchrun per node. `--procs-per-node` (or its older name `--gpus-per-node`) is the number of training processes
on a node: GPUs, or CPU processes with `--env DS_ACCELERATOR=cpu`, for which SLURM is asked for no GPUs. The
command checks the shape against the batch settings, writes the rendered script and the resolved config into
`<run-dir>/launch/`, then submits or runs it; `--dry-run` only prints, `--smoke` submits a short check of the
cluster (mea.tools.cluster_check) on the same shape and waits for its lines.

Under SLURM a job is stopped three ways, and each ends with every rank's checkpoint at one agreed step:
- the time-limit warning (`--signal=B:USR1@…`, to the batch shell): the script sends SIGTERM to the tasks (each
  torchrun forwards it to its workers), waits for them to save, and requeues the job itself (`scontrol
  requeue`); the next allocation resumes from that checkpoint;
- preemption (`scontrol requeue`, or a scheduler that preempts with requeue): SLURM sends SIGTERM to the tasks
  and requeues the job; the ranks save within `KillWait`;
- `scancel`: SIGTERM, the ranks save, nothing requeues.
A requeued allocation waits for the run directory's lease (mea.run_directory) while an earlier one still holds it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from mea.config import ConfigError, batch_plan, compose_config
from mea.run_directory import write_synced

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "train.py"


class LaunchError(ValueError):
    """A launch that cannot work; one line that says what to change."""


@dataclass
class Shape:
    nodes: int
    procs_per_node: int
    master_addr: str
    master_port: int | None  # under SLURM, None: one derived from the job's id (below)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def train_args(overrides: list[str], run_dir: str) -> list[str]:
    return [str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]


def smoke_args(overrides: list[str], run_dir: str) -> list[str]:
    return ["-m", "mea.tools.cluster_check", run_dir, *overrides]


def check_batch(overrides: list[str], shape: Shape, run_dir: str):
    """Compose the training config as train.py will, and refuse a shape its batch settings cannot split."""
    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    cfg.run_dir = run_dir
    try:
        batch_plan(cfg, shape.world_size)
    except ConfigError as e:
        raise LaunchError(f"{shape.nodes} nodes × {shape.procs_per_node} processes = {shape.world_size} ranks cannot split the batch: {e}") from None
    if shape.world_size > 1 and not cfg.deepspeed.enabled:
        raise LaunchError(f"{shape.world_size} ranks need DeepSpeed; add deepspeed=zero1 (or zero0/zero2/zero3) to the overrides")
    return cfg


def torchrun_command(torchrun: str, shape: Shape, node_rank: int | None, endpoint: str, rdzv_id: str, program: list[str]) -> list[str]:
    """One node's torchrun; without a node rank (under srun) the c10d rendezvous numbers the nodes itself."""
    return [
        torchrun,
        f"--nnodes={shape.nodes}",
        f"--nproc_per_node={shape.procs_per_node}",
        *([f"--node_rank={node_rank}"] if node_rank is not None else []),
        f"--rdzv_id={rdzv_id}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        *program,
    ]


def on_cpu(env: list[str]) -> bool:
    return "DS_ACCELERATOR=cpu" in env


def render_sbatch(args: argparse.Namespace, shape: Shape, torchrun: str, program: list[str], run_dir: str) -> str:
    logs = Path(run_dir) / "logs"
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={shape.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the node's training processes
        *([] if on_cpu(args.env) else [f"--gpus-per-node={shape.procs_per_node}"]),
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={args.time}",
        f"--output={logs}/%x-%j.out",
        f"--error={logs}/%x-%j.err",
        "--open-mode=append",  # a requeued allocation appends to the same log
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",  # the warning before the time limit, to this script (below)
    ]
    if args.partition:
        directives.append(f"--partition={args.partition}")
    if args.account:
        directives.append(f"--account={args.account}")
    if args.qos:
        directives.append(f"--qos={args.qos}")
    if args.constraint:
        directives.append(f"--constraint={args.constraint}")
    node = torchrun_command(torchrun, shape, None, "$MASTER_ADDR:$MASTER_PORT", "$SLURM_JOB_ID", program)
    body = [
        "set -euo pipefail",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'export MASTER_ADDR=$(scontrol show node "$first_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        # jobs sharing a node (one-GPU runs of a sweep or a sitting) each need a port of their own: one per job id
        f"export MASTER_PORT=${{MASTER_PORT:-{shape.master_port or '$((20000 + SLURM_JOB_ID % 40000))'}}}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        *[f"export {line}" for line in args.env],
        f"cd {shlex.quote(str(ROOT))}",
        "# Before the time limit: SIGTERM to the tasks (not to srun, which would cancel the step), every rank saves at",
        "# one step, and the job goes back in the queue unless the run finished.",
        "save_and_requeue() {",
        '    scancel --signal=TERM "$SLURM_JOB_ID"',
        '    wait "$SRUN_PID" || true',
        f'    [ -f {shlex.quote(str(Path(run_dir) / "summary.json"))} ] || scontrol requeue "$SLURM_JOB_ID"',
        "}",
        "trap save_and_requeue USR1",
        "srun --kill-on-bad-exit=1 " + " ".join(quote(p) for p in node) + " &",
        "SRUN_PID=$!",
        'wait "$SRUN_PID"',
    ]
    return "#!/bin/bash\n" + "".join(f"#SBATCH {d}\n" for d in directives) + "\n" + "\n".join(body) + "\n"


def quote(part: str) -> str:
    """Shell-quote, leaving $VARIABLES for the shell that runs the script to expand."""
    return part if "$" in part and " " not in part else shlex.quote(part)


def hostfile(hosts: list[str], procs_per_node: int) -> str:
    return "".join(f"{host} slots={procs_per_node}\n" for host in hosts)


def deepspeed_command(shape: Shape, hostfile_path: Path, overrides: list[str], run_dir: str) -> list[str]:
    return [
        "deepspeed",
        f"--hostfile={hostfile_path}",
        f"--num_nodes={shape.nodes}",
        f"--num_gpus={shape.procs_per_node}",
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
    parser.add_argument("--procs-per-node", "--gpus-per-node", dest="procs_per_node", type=int, default=1,
                        help="training processes per node: GPUs, or CPU processes with --env DS_ACCELERATOR=cpu (then SLURM is asked for no GPUs)")
    parser.add_argument("--run-dir", required=True, help="the run directory, on storage every node sees")
    parser.add_argument("--master-addr", default="127.0.0.1", help="torchrun/deepspeed: the first node's address")
    parser.add_argument("--master-port", type=int, help="the rendezvous port (default: 29500; under SLURM one derived from the job's id)")
    parser.add_argument("--node-rank", type=int, help="torchrun: run this node's command here (else print every node's)")
    parser.add_argument("--hosts", help="deepspeed: comma-separated hosts, the first is the master (default: this machine)")
    parser.add_argument("--job-name", default="mea")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint", help="slurm: node features the job needs (e.g. h100)")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--cpus-per-task", type=int, default=16)
    parser.add_argument("--signal-seconds", type=int, default=120, help="slurm: USR1 this long before the time limit")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="slurm: exported in the job (NCCL settings, caches)")
    parser.add_argument("--smoke", action="store_true", help="slurm: submit a short check of the cluster on this shape and wait for its lines")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written and run; change nothing")
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1 :]
    return parser.parse_args(argv), []


JOB_RECORD = "job.json"  # <run-dir>/launch/job.json: the SLURM job that trains the run


def submit(sbatch: str, script: str, out: Path, wait: bool) -> int:
    """Submit the rendered script; SLURM's own reason and exit 2 if it refuses. The script is kept in
    <run-dir>/launch/ only once the job is accepted, so a refused submission leaves that folder as it was."""
    pending = out / f"slurm.sbatch.{os.getpid()}.pending"
    pending.write_text(script)
    try:
        proc = subprocess.run([sbatch, "--parsable", *(["--wait"] if wait else []), str(pending)], capture_output=True, text=True)
        if not proc.stdout.strip():  # no job id: refused
            said = [line.removeprefix("sbatch: error: ") for line in proc.stderr.splitlines() if line.strip()]
            raise LaunchError(f"sbatch refused the job: {said[-1] if said else f'exit {proc.returncode}'}")
        pending.replace(out / "slurm.sbatch")
    finally:
        pending.unlink(missing_ok=True)
    job = proc.stdout.strip().split(";")[0]
    write_synced(out / JOB_RECORD, json.dumps({"job": job, "submitted": time.time()}))  # how a driver finds the run's job again (mea.studies.cluster)
    if not wait:
        print(f"submitted job {job}; follow it with `squeue -j {job}` and {out.parent / 'logs'}/")
    return proc.returncode


def render(args: argparse.Namespace, shape: Shape, hosts: list[str] | None, torchrun: str, program: list[str], overrides: list[str],
           run_dir: str) -> tuple[dict[str, str], list[str] | None]:
    """The backend's files (under <run_dir>/launch/) and the command this machine runs (None: one line per node to run by hand)."""
    out = Path(run_dir) / "launch"
    if args.backend == "slurm":
        files = {"slurm.sbatch": render_sbatch(args, shape, torchrun, program, run_dir)}
        command = ["sbatch", str(out / "slurm.sbatch")]
    elif args.backend == "torchrun":
        endpoint = f"{shape.master_addr}:{shape.master_port}"
        per_node = [torchrun_command(torchrun, shape, rank, endpoint, args.job_name, program) for rank in range(shape.nodes)]
        files = {"torchrun.sh": "#!/bin/bash\n# one line per node; run line i on node i\n" + "".join(shlex.join(c) + "\n" for c in per_node)}
        command = per_node[args.node_rank] if args.node_rank is not None else None
    else:
        hosts = hosts or ["localhost"]
        files = {"hostfile": hostfile(hosts, shape.procs_per_node)}
        command = deepspeed_command(shape, out / "hostfile", overrides, run_dir)
        files["deepspeed.sh"] = "#!/bin/bash\n" + shlex.join(command) + "\n"
    return files, command


def launch(argv: list[str]) -> int:
    args, overrides = parse(argv)
    hosts = args.hosts.split(",") if args.hosts else None
    nodes = len(hosts) if hosts else args.nodes
    master = hosts[0] if hosts and args.master_addr == "127.0.0.1" else args.master_addr
    shape = Shape(nodes, args.procs_per_node, master, args.master_port or (None if args.backend == "slurm" else 29500))
    run_dir = str(Path(args.run_dir).absolute())
    if args.smoke and args.backend != "slurm":
        raise LaunchError("--smoke checks a SLURM cluster; use it with mea-launch slurm")
    cfg = check_batch(overrides, shape, run_dir)
    out = Path(run_dir) / "launch"
    program = smoke_args(overrides, run_dir) if args.smoke else train_args(overrides, run_dir)
    tool = {"slurm": "sbatch", "torchrun": "torchrun", "deepspeed": "deepspeed"}[args.backend]
    executable = find_tool(tool)
    torchrun = find_tool("torchrun") or "torchrun"  # absolute where it can be: a job's shell has no activated environment

    files, command = render(args, shape, hosts, torchrun, program, overrides, run_dir)
    files["config.yaml"] = OmegaConf.to_yaml(cfg, resolve=False)

    if args.dry_run:
        for name, text in files.items():
            print(f"# --- {out / name}\n{text}")
        if command:
            print(shlex.join(command))
        return 0
    if command and executable is None:
        raise LaunchError(f"{tool} is not on the PATH of this machine; install it (or activate the environment that has it), or add --dry-run to only render")
    if args.backend == "slurm" and not Path(torchrun).is_absolute():
        raise LaunchError("torchrun is not installed beside this Python nor on the PATH; install torch into the environment the job will use")
    if command and args.backend != "slurm" and is_local(shape.master_addr) and (args.node_rank in (None, 0)) and not port_free(shape.master_addr, shape.master_port):
        raise LaunchError(f"port {shape.master_port} is in use on {shape.master_addr}; pass another --master-port")
    made = [folder for folder in (Path(run_dir), out, Path(run_dir) / "logs") if not folder.exists()]
    out.mkdir(parents=True, exist_ok=True)
    if args.backend == "slurm":
        (Path(run_dir) / "logs").mkdir(exist_ok=True)  # SLURM opens --output before the script runs: it must exist
        try:
            code = submit(executable, files.pop("slurm.sbatch"), out, wait=args.smoke)
        except LaunchError:
            for folder in reversed(made):  # a refused job leaves the run directory as it was
                folder.rmdir()
            raise
        if args.smoke:
            return report_smoke(Path(run_dir), code)
    for name, text in files.items():
        (out / name).write_text(text)
    if args.backend == "slurm":
        return 0
    if command is None:
        print(f"wrote {out / 'torchrun.sh'}; run line i on node i (or pass --node-rank i here):")
        print(files["torchrun.sh"])
        return 0
    print(shlex.join(command), flush=True)
    return subprocess.call([executable, *command[1:]], env={**os.environ, "PYTHONUNBUFFERED": "1"})


def report_smoke(run_dir: Path, code: int) -> int:
    """The cluster check's lines, from the job's log; 0 only if the job ran and every check passed."""
    from mea.tools.cluster_check import REPORT

    report = run_dir / REPORT
    if not report.is_file():
        logs = sorted((run_dir / "logs").glob("*.err"))
        tail = [line for line in (logs[-1].read_text().splitlines() if logs else []) if line.strip()][-1:]
        print(f"FAIL job: it ended (exit {code}) before the checks reported{': ' + tail[0] if tail else ''}; see {run_dir / 'logs'}/")
        return 1
    text = report.read_text()
    print(text, end="")
    return 0 if code == 0 and "FAIL" not in text else 1


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(launch(sys.argv[1:] if argv is None else argv))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
