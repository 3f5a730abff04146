#!/usr/bin/env bash
# A real SLURM cluster on loopback for the tests: one slurmctld and two slurmd
# pretending to be nodes n1 and n2 (CPUs=2 each), with their own munged and a
# munge key made for it. Everything (config, state, spool, logs, pid files) lives
# in DIR; nothing outside it is touched except /etc/hosts, which gets a line for n1
# and n2 when they do not resolve (removed again by `down`).
#
#   tests/slurm/cluster.sh up DIR      # start; prints `export SLURM_CONF=DIR/slurm.conf`
#   tests/slurm/cluster.sh down DIR    # cancel every job, stop every daemon by its pid file
#
# Needs root and Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge).
# Ports: CIFAR_DDP_SLURM_PORT (default 17000) for slurmctld, the next two for the slurmd.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf
hosts_line="127.0.0.1 n1 n2  # cifar_ddp tests/slurm/cluster.sh"
export SLURM_CONF=$conf

# Wait up to $1 seconds for the command after it to succeed.
wait_until() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}

both_nodes_idle() {
    [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq 2 ]
}

up() {
    local port=${CIFAR_DDP_SLURM_PORT:-17000} host
    host=$(hostname -s)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    chmod 700 "$dir/munge"

    # munge: a key of our own and a socket in DIR, so that no system munged is needed or used.
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"

    cat > "$conf" <<CONF
# Written by tests/slurm/cluster.sh: two pretend nodes on this machine, loopback only.
ClusterName=cifarddp
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
# A stopped job's ranks get SIGTERM, then SIGKILL this many seconds later.
KillWait=15
MinJobAge=600
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((port + 1))-$((port + 2))] CPUs=2 State=UNKNOWN
PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

    # The job scripts reach the first node by its name, as on a real cluster.
    if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
        [ -z "$(tail -c 1 /etc/hosts)" ] || echo >> /etc/hosts
        echo "$hosts_line" >> /etc/hosts
        touch "$dir/added-hosts-line"
    fi

    slurmctld -f "$conf"
    for node in n1 n2; do
        slurmd -f "$conf" -N "$node"
    done
    if ! wait_until 60 both_nodes_idle; then
        echo "cluster.sh: the two nodes did not come up idle within 60 s; logs in $dir/log" >&2
        sinfo -N >&2 || true
        return 1
    fi
    echo "export SLURM_CONF=$conf"
}

# Stop the process in pid file $1: SIGTERM, then SIGKILL after 15 s.
stop_pidfile() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_until 15 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# Processes started by this cluster's jobs carry SLURM_CONF=$conf in their environment.
job_processes() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}; pid=${pid%/environ}
        [ "$pid" != $$ ] || continue
        # Only job steps' processes: they have SLURM_JOB_ID too (this script and the tests do not).
        if grep -qzxF "SLURM_CONF=$conf" "$environ" 2>/dev/null && grep -qz '^SLURM_JOB_ID=' "$environ" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

down() {
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        scancel --full --quiet --partition=test 2>/dev/null || true
        wait_until 30 bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]' || true
    fi
    stop_pidfile "$dir/slurmd-n1.pid"
    stop_pidfile "$dir/slurmd-n2.pid"
    stop_pidfile "$dir/slurmctld.pid"
    local leftover
    leftover=$(job_processes)
    if [ -n "$leftover" ]; then
        echo "cluster.sh: stopping processes the jobs left behind: $leftover" >&2
        kill -KILL $leftover 2>/dev/null || true
    fi
    stop_pidfile "$dir/munge/munged.pid"
    if [ -f "$dir/added-hosts-line" ]; then
        # Rewrite in place (no rename): /etc/hosts is often a bind mount.
        grep -vxF "$hosts_line" /etc/hosts > "$dir/hosts.tmp" || true
        cat "$dir/hosts.tmp" > /etc/hosts
        rm -f "$dir/hosts.tmp" "$dir/added-hosts-line"
    fi
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
