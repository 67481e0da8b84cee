#!/bin/bash
# Evaluate a run directory's complete checkpoints with vqd-eval, as its own single-task job.
#
#   # once, after training finished successfully:
#   RUN_DIR=runs/vqd_b sbatch --dependency=afterok:$TRAIN_JOB_ID slurm/eval.sh
#   # as a watcher next to training (evaluates each new complete checkpoint once); it may start first:
#   # it waits for the run to appear (RUN_DIR/config.yaml and a complete checkpoint), up to
#   # --wait-for-run seconds (default eval.idle_timeout), e.g. EVAL_ARGS="--wait-for-run 86400"
#   RUN_DIR=runs/vqd_b EVAL_MODE=watch sbatch slurm/eval.sh
#   # CPU (what tests/slurm runs):
#   VQD_DEVICE=cpu RUN_DIR=runs/tiny sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/eval.sh
#
# Submit from the repository root. Environment: RUN_DIR (required), EVAL_MODE (once|watch),
# EVAL_ARGS (extra vqd-eval arguments, split like a command line), VQD_DEVICE, PYTHON — see slurm/common.sh.
#
#SBATCH --job-name=vqd-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1                # sampling + metrics in one process
#SBATCH --gpus-per-node=1         # --gpus-per-node=0 on CPU-only clusters
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR2@60        # pre-empted / out of time: requeue; evaluation is idempotent
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
source "${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
cd "$VQD_ROOT"

[[ -n "${RUN_DIR:-}" ]] || vqd_die "set RUN_DIR to the training run directory to evaluate"
EVAL_MODE="${EVAL_MODE:-once}"
[[ "$EVAL_MODE" == once || "$EVAL_MODE" == watch ]] || vqd_die "EVAL_MODE=$EVAL_MODE: use once or watch"
# a watcher may start before its training job has created the run: vqd-eval --watch waits for it
[[ "$EVAL_MODE" == watch || -d "$RUN_DIR" ]] || \
    vqd_die "RUN_DIR=$RUN_DIR does not exist (paths are relative to $VQD_ROOT; EVAL_MODE=watch waits for it)"
vqd_jobargs split EVAL_ARGS  # split like a command line; one-line error on unbalanced quotes
EARGS=("${VQD_WORDS[@]}")
DEVICE="$(vqd_device)"
vqd_device_env "$DEVICE"
vqd_record eval_start ", \"mode\": \"$EVAL_MODE\""
vqd_log "eval: run_dir=$RUN_DIR mode=$EVAL_MODE device=$DEVICE"

vqd_srun_requeueable --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m vqd_scale.cli.eval "$RUN_DIR" "--$EVAL_MODE" "${EARGS[@]}"
exit "$VQD_RC"
