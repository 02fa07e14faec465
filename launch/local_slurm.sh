#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for the tests and for trying mea-launch / mea-sweep --slurm before a
# real cluster: munge, slurmctld and two slurmd nodes (n1, n2) of one CPU each, in one CPU partition, every
# daemon on 127.0.0.1 with its state, logs and pid files in one folder.
#
#   launch/local_slurm.sh up [DIR]     start it (DIR defaults to $MEA_SLURM_DIR or /tmp/mea-slurm), print the SLURM_CONF to export
#   launch/local_slurm.sh down [DIR]   stop its daemons by their pid files
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root, as slurmd does on any cluster.
set -euo pipefail

action=${1:-}
dir=${2:-${MEA_SLURM_DIR:-/tmp/mea-slurm}}
case "$action" in up | down) ;; *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;; esac
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

stop_daemons() {
    local pidfile pid
    for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

if [ "$action" = down ]; then
    if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then  # end the jobs first: their steps outlive slurmd
        export SLURM_CONF=$dir/slurm.conf
        scancel --full --quiet $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_daemons
    exit 0
fi

for tool in munged mungekey slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed; apt-get install slurm-wlm munge" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: slurmd runs jobs as their users and needs root; run this as root" >&2; exit 2; }
stop_daemons  # a cluster left in this folder by an earlier run
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

mkdir -p "$dir/munge" "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/log"
chmod 700 "$dir/munge"
[ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

cat >"$dir/slurm.conf" <<EOF
ClusterName=mea-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
ReturnToService=2
# Refuse at submission a job the partition can never run (more nodes than it has), as production clusters do.
EnforcePartLimits=ALL
# A stopped job's tasks get SIGTERM, then SIGKILL this many seconds later: the time a rank has to checkpoint.
KillWait=30
MinJobAge=600
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=cpu Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$dir/slurm.conf
slurmctld -i
slurmd -N n1
slurmd -N n2
for _ in $(seq 100); do
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.2
done
echo "error: the local cluster's nodes did not come up within 20 s; see $dir/log/" >&2
stop_daemons
exit 1
