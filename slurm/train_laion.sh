#!/bin/bash
# Train VQ-Diffusion on LAION (+CC15M) with DeepSpeed: one srun task per GPU, across nodes,
# checkpoint + requeue on pre-emption / time limit, resume with `--resume auto`.
#
#   mkdir -p logs && sbatch slurm/train_laion.sh                      # 4 nodes x 8 GPUs (defaults below)
#   CONFIG=configs/laion_vqd_b.yaml RUN_DIR=runs/vqd_b OVERRIDES="optim.lr=3e-4" \
#       sbatch --nodes=16 slurm/train_laion.sh
#   # overrides with spaces: one per line in a file (verbatim), or quoted in OVERRIDES
#   CONFIG=configs/laion_vqd_b.yaml RUN_DIR=runs/vqd_b OVERRIDES_FILE=my_overrides.txt sbatch slurm/train_laion.sh
#   # CPU (no GPU, gloo; what tests/slurm runs): one task per node
#   VQD_DEVICE=cpu CONFIG=configs/tiny.yaml RUN_DIR=runs/tiny \
#       sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=2 slurm/train_laion.sh
#   # stop for good: scancel $JOB; pre-empt by hand (checkpoint, requeue, resume): scancel --signal=USR2 --batch $JOB
#
# Submit from the repository root. Environment (all optional): CONFIG, RUN_DIR, OVERRIDES, OVERRIDES_FILE,
# VQD_DEVICE (auto|gpu|cpu), GPUS_PER_NODE, TASKS_PER_NODE, PYTHON, MASTER_PORT — see slurm/common.sh.
#
#SBATCH --job-name=vqd-laion
#SBATCH --nodes=4                 # data-parallel nodes; override with sbatch --nodes=N
#SBATCH --ntasks-per-node=8       # one task per GPU
#SBATCH --gpus-per-node=8         # --gpus-per-node=0 on CPU-only clusters
#SBATCH --cpus-per-task=10        # data-loader workers + the training thread
#SBATCH --time=24:00:00           # requeue carries the run past this limit
#SBATCH --signal=B:USR2@180       # to this shell 180 s before the limit: checkpoint, then requeue
#SBATCH --requeue                 # allow requeue (ours, and the scheduler's on node failure / pre-emption)
#SBATCH --open-mode=append        # a requeued job appends to the same log
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
source "${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
cd "$VQD_ROOT"

CONFIG="${CONFIG:-configs/laion_vqd_b.yaml}"
[[ -f "$CONFIG" ]] || vqd_die "CONFIG=$CONFIG does not exist (paths are relative to $VQD_ROOT)"
DEVICE="$(vqd_device)"
vqd_train_args  # one-line error and exit 2 on a bad config/override; sets RUN_DIR and VQD_OVERRIDES
NTASKS_NODE="$(vqd_tasks_per_node "$DEVICE")"
vqd_rendezvous
vqd_device_env "$DEVICE"
vqd_record start ", \"device\": \"$DEVICE\", \"tasks_per_node\": $NTASKS_NODE"
vqd_log "train: config=$CONFIG run_dir=$RUN_DIR device=$DEVICE nodes=$SLURM_JOB_NUM_NODES" \
        "tasks/node=$NTASKS_NODE master=$MASTER_ADDR:$MASTER_PORT restart=${SLURM_RESTART_COUNT:-0}"

vqd_srun_requeueable \
    --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$NTASKS_NODE" \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 --wait="$VQD_TASK_EXIT_WAIT" \
    "$PYTHON" -m vqd_scale.cli.train "$CONFIG" "${VQD_OVERRIDES[@]}" "run_dir=$RUN_DIR" --resume auto
exit "$VQD_RC"
