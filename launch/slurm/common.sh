# What the job scripts in launch/slurm/ share; they source it, nobody runs it.
#
# Sets REPO (the checkout: CIFAR_DDP_DIR, else the folder sbatch was called from),
# PYTHON (PYTHON, else REPO/.venv/bin/python when there is one, else python),
# NPROC_PER_NODE (NPROC_PER_NODE, else the GPUs SLURM gave the node, else 1),
# HEAD_NODE (the job's first node) and PORT (MASTER_PORT, else one derived from the
# job id by the rule distributed.slurm_port uses), and defines run_step.

REPO=${CIFAR_DDP_DIR:-$SLURM_SUBMIT_DIR}
if [ ! -f "$REPO/launch/train.py" ]; then
    echo "cifar_ddp: no launch/train.py in $REPO: submit from the checkout's root or set CIFAR_DDP_DIR" >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export NPROC_PER_NODE HEAD_NODE PORT
# How often a job may put itself back in the queue (SLURM_RESTART_COUNT counts them).
MAX_REQUEUES=${MAX_REQUEUES:-50}
# srun does not inherit sbatch's --cpus-per-task since SLURM 22.05.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

# run_step COMMAND...: run the job step COMMAND (an srun) and end the batch script as
# the run ended.
#   - USR1 (--signal=B:USR1@SECONDS before the time limit, or by hand with
#     `scancel --signal=USR1 --batch JOBID`): the step's processes get SIGTERM, every rank
#     checkpoints at its next sync step and leaves with status 75; then the job puts
#     itself back in the queue and the next start continues with train.resume=auto.
#   - SIGTERM to the whole job (the time limit, scancel, preemption, `scontrol requeue`):
#     the ranks checkpoint and stop the same way within KillWait (SIGKILL follows). At
#     the time limit the job requeues itself as after USR1; otherwise SLURM decides
#     whether it comes back (it does after a requeue or a preemption with
#     PreemptMode=REQUEUE; a cancelled job does not).
#   - A step that fails for any other reason is not requeued: the job fails with its status.
run_step() {
    local stop_asked=0 got_term=0 step rc again
    trap 'stop_asked=1
          echo "cifar_ddp: USR1 at $(date +%T): checkpointing at the next sync step, then requeueing" >&2
          scancel --signal=TERM "$SLURM_JOB_ID"' USR1
    trap 'got_term=1
          echo "cifar_ddp: SIGTERM at $(date +%T): the ranks checkpoint and stop" >&2
          if past_time_limit; then stop_asked=1; fi' TERM
    echo "cifar_ddp: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST" \
         "($NPROC_PER_NODE per node, head $HEAD_NODE:$PORT)" >&2
    "$@" &
    step=$!
    # A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again.
    while :; do
        wait "$step"; rc=$?
        kill -0 "$step" 2>/dev/null || break
    done
    # If the signal came just as the step ended, the status is still to be collected.
    wait "$step" 2>/dev/null; again=$?
    [ "$again" -eq 127 ] || rc=$again
    trap - USR1 TERM
    if [ "$rc" -eq 0 ]; then
        exit 0
    fi
    if [ "$stop_asked" -eq 0 ] && [ "$got_term" -eq 1 ]; then
        echo "cifar_ddp: stopped by SIGTERM (status $rc); SLURM decides whether the job comes back" >&2
        exit "$rc"
    fi
    if [ "$stop_asked" -eq 0 ]; then
        echo "cifar_ddp: the job step failed (status $rc); not requeued" >&2
        exit "$rc"
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        echo "cifar_ddp: stopped, but already requeued $MAX_REQUEUES times (MAX_REQUEUES); not requeued" >&2
        exit 75
    fi
    echo "cifar_ddp: stopped (status $rc); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "cifar_ddp: scontrol requeue failed; resubmit to continue" >&2
    exit 75
}

# True when the job's time limit has passed (its SIGTERM is then the limit's, not scancel's):
# StartTime + TimeLimit, since a cancelled job's EndTime is the moment it was cancelled.
past_time_limit() {
    local info start limit days=0 h m sec
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || return 1
    start=$(grep -o ' StartTime=[^ ]*' <<< "$info" | cut -d= -f2)
    limit=$(grep -o ' TimeLimit=[^ ]*' <<< "$info" | cut -d= -f2)
    case $limit in *[0-9]:[0-9]*) ;; *) return 1 ;; esac   # UNLIMITED, Partition_Limit, ...
    if [[ $limit == *-* ]]; then days=${limit%%-*}; limit=${limit#*-}; fi
    IFS=: read -r h m sec <<< "$limit"
    [ -n "$sec" ] || { sec=$m; m=$h; h=0; }                   # mm:ss
    limit=$(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$sec ))
    [ $(( $(date -d "$start" +%s) + limit )) -le "$(date +%s)" ]
}
