# Shared helpers for the slurm/*.sh batch scripts; `source` it, don't run it.
#
# Conventions every script here follows (train_laion.sh is the reference):
#   * submit from the repository root (or set VQD_ROOT): batch scripts are copied to the slurmd
#     spool, so paths are resolved from $VQD_ROOT, which defaults to $SLURM_SUBMIT_DIR;
#   * #SBATCH lines give GPU-cluster defaults; every one can be overridden with sbatch flags and
#     every job parameter with environment variables (sbatch exports the caller's environment):
#       CONFIG, RUN_DIR, OVERRIDES (dotted overrides, split like a command line: quote one that
#       contains spaces), OVERRIDES_FILE (one override per line, verbatim), VQD_DEVICE (auto|gpu|cpu),
#       GPUS_PER_NODE, TASKS_PER_NODE, PYTHON, MASTER_PORT, VQD_REQUEUE_EXIT, VQD_MAX_RESTARTS,
#       VQD_TASK_EXIT_WAIT;
#   * the job parameters are checked (vqd_scale/launch/jobargs.py) before srun: a bad value is one
#     ERROR line in the log and exit 2;
#   * USR1/USR2 to the batch shell (--signal=B:USR2@T, `scancel --signal=USR2 --batch`) mean
#     "checkpoint and requeue"; SIGTERM (`scancel`, SLURM's own requeue or pre-emption, the end of the
#     time limit) means "checkpoint if you can and stop": the job is then never requeued by this script;
#   * logs go to logs/ (create it before sbatch) and are appended to across requeues;
#   * every job appends one JSON line per start / requeue to $RUN_DIR/slurm_jobs.jsonl.

VQD_ROOT="${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON="${PYTHON:-python}"
# Exit code with which vqd-train says "checkpointed on a signal, requeue me"
# (= vqd_scale.train.signals.EXIT_PREEMPTED; tests/slurm checks they agree).
VQD_REQUEUE_EXIT="${VQD_REQUEUE_EXIT:-42}"
VQD_MAX_RESTARTS="${VQD_MAX_RESTARTS:-50}"
# After the first task of a step ends, srun ends the others this many seconds later. Ranks leave a
# pre-emption save a moment apart, so no --kill-on-bad-exit (it would SIGTERM the late ones, which
# vqd-train treats as another save request); a crashed rank still cannot leave the rest hanging.
VQD_TASK_EXIT_WAIT="${VQD_TASK_EXIT_WAIT:-120}"

vqd_log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] $*"; }

vqd_die() { echo "ERROR: $*" >&2; exit 2; }

# gpu when nvidia-smi lists a GPU, else cpu; VQD_DEVICE=cpu|gpu forces it.
vqd_device() {
    case "${VQD_DEVICE:-auto}" in
        gpu|cpu) echo "$VQD_DEVICE" ;;
        auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
                  echo gpu; else echo cpu; fi ;;
        *) vqd_die "VQD_DEVICE=$VQD_DEVICE: use auto, gpu or cpu" ;;
    esac
}

# MASTER_ADDR = first host of the allocation; MASTER_PORT derived from the job id so two jobs
# sharing a node don't collide, and a requeued job (same id) reuses its port. Kept below the
# ephemeral range (32768+); the same formula as vqd_scale.train.distributed.slurm_job_port.
vqd_rendezvous() {
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    fi
    MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 12000 ))}"
    export MASTER_ADDR MASTER_PORT
}

# Environment for the training processes on this device.
vqd_device_env() {
    local device="$1"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/vqd_scale/torch_extensions}"
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # compute nodes must never wait on the hub
    if [[ "$device" == cpu ]]; then
        export DS_ACCELERATOR=cpu  # DeepSpeed on CPU: gloo backend
    fi
}

# Tasks per node: one per GPU (GPUS_PER_NODE, else what SLURM or nvidia-smi reports), one on CPU.
vqd_tasks_per_node() {
    local device="$1"
    if [[ -n "${TASKS_PER_NODE:-}" ]]; then echo "$TASKS_PER_NODE"; return; fi
    if [[ "$device" == cpu ]]; then echo 1; return; fi
    local g="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
    if [[ -z "$g" ]]; then g="$(nvidia-smi -L | grep -c '^GPU')"; fi
    echo "$g"
}

# NUL-terminated words that `python -m vqd_scale.launch.jobargs "$@"` prints → the array VQD_WORDS;
# its one-line error ends the job (exit 2) before anything starts.
vqd_jobargs() {
    local out
    out="$(mktemp)"
    if ! "$PYTHON" -m vqd_scale.launch.jobargs "$@" > "$out"; then rm -f "$out"; exit 2; fi
    mapfile -d '' -t VQD_WORDS < "$out"
    rm -f "$out"
}

# Validate CONFIG + OVERRIDES_FILE + OVERRIDES (+ RUN_DIR); set RUN_DIR (CONFIG's run_dir when unset)
# and the array VQD_OVERRIDES for `vqd-train CONFIG "${VQD_OVERRIDES[@]}" run_dir=$RUN_DIR`.
vqd_train_args() {
    vqd_jobargs train "$CONFIG"
    RUN_DIR="${VQD_WORDS[0]}"
    VQD_OVERRIDES=("${VQD_WORDS[@]:1}")
}

# JobState of this job as slurmctld sees it (RUNNING; COMPLETING once it is being cancelled/requeued).
vqd_job_state() {
    scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2
}

# One JSON line per event into RUN_DIR/slurm_jobs.jsonl (job id, restart count, nodes, time).
vqd_record() {
    local event="$1" extra="${2:-}"
    mkdir -p "$RUN_DIR"
    printf '{"event": "%s", "job_id": "%s", "array_task_id": "%s", "restart_count": %d, "nodes": "%s", "time": %s%s}\n' \
        "$event" "${SLURM_JOB_ID:-}" "${SLURM_ARRAY_TASK_ID:-}" "${SLURM_RESTART_COUNT:-0}" \
        "${SLURM_JOB_NODELIST:-}" "$(date +%s.%N)" "$extra" >> "$RUN_DIR/slurm_jobs.jsonl"
}

# Run "$@" under srun in the background, forwarding pre-emption signals to the job step, and
# requeue the job when training checkpointed because of USR1/USR2 (never after SIGTERM). Sets VQD_RC.
vqd_srun_requeueable() {
    VQD_PREEMPTED=0
    VQD_CANCELLED=0
    VQD_SRUN_PID=""
    # Slurm sends --signal=B:USR2@T to this shell only; srun relays what it receives to every task,
    # where vqd-train sets a flag, saves at the next step boundary and exits with VQD_REQUEUE_EXIT.
    # Whatever arrived here, the tasks get USR2: NCCL may catch USR1 (submitit #1697), and SIGTERM to
    # srun would make it SIGKILL them.
    _vqd_forward() {
        VQD_PREEMPTED=1
        vqd_log "caught SIG$1: asking the job step to checkpoint (SIGUSR2); the job is requeued afterwards"
        [[ -n "$VQD_SRUN_PID" ]] && kill -s USR2 "$VQD_SRUN_PID" 2>/dev/null || true
    }
    # SIGTERM reaches this shell and every task when the job is cancelled (`scancel`), requeued or
    # pre-empted by SLURM itself (which then requeues it), or at its time limit: the ranks save if they
    # can within KillWait, and this script must not requeue (a cancelled job would come back).
    _vqd_cancel() {
        VQD_CANCELLED=1
        vqd_log "caught SIGTERM (scancel, SLURM's own requeue/pre-emption or the time limit): the job step" \
                "checkpoints if it can; this script will not requeue the job"
        [[ -n "$VQD_SRUN_PID" ]] && kill -s USR2 "$VQD_SRUN_PID" 2>/dev/null || true
    }
    trap '_vqd_forward USR1' USR1
    trap '_vqd_forward USR2' USR2
    trap '_vqd_cancel' TERM
    srun "$@" &
    VQD_SRUN_PID=$!
    # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun is gone.
    while kill -0 "$VQD_SRUN_PID" 2>/dev/null; do
        wait "$VQD_SRUN_PID" || true
    done
    VQD_RC=0
    wait "$VQD_SRUN_PID" || VQD_RC=$?  # bash keeps the exit status of a reaped background job
    trap - USR1 USR2 TERM
    vqd_log "job step exited with status $VQD_RC (pre-empted: $VQD_PREEMPTED)"
    if [[ "$VQD_CANCELLED" -eq 1 ]]; then
        vqd_log "not requeuing: the job got SIGTERM (cancelled, or requeued / pre-empted by SLURM itself)"
        return
    fi
    if [[ "$VQD_RC" -ne 0 ]] && { [[ "$VQD_PREEMPTED" -eq 1 ]] || [[ "$VQD_RC" == "$VQD_REQUEUE_EXIT" ]]; }; then
        local state
        state="$(vqd_job_state)"
        if [[ -n "$state" && "$state" != RUNNING ]]; then
            # `scontrol requeue` would even bring back a job that is being cancelled (state COMPLETING)
            vqd_log "not requeuing: the job is ending (state $state)"
            return
        fi
        if (( ${SLURM_RESTART_COUNT:-0} >= VQD_MAX_RESTARTS )); then
            vqd_log "not requeuing: already restarted ${SLURM_RESTART_COUNT} times (VQD_MAX_RESTARTS)"
            return
        fi
        vqd_record requeue ", \"step_exit\": $VQD_RC"
        vqd_log "requeuing job $SLURM_JOB_ID; it resumes from the newest complete checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        # requeue ends this shell; should it return anyway, exit 0 so nothing counts this as a failure
        sleep 5
        VQD_RC=0
    fi
}
