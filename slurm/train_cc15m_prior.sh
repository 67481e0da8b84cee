#!/bin/bash
# Train the shifted-diffusion prior (Corgi) on CC15M: same launcher as slurm/train_laion.sh (one srun
# task per GPU, checkpoint + requeue on pre-emption / time limit, `--resume auto`), another config.
#
#   mkdir -p logs && sbatch slurm/train_cc15m_prior.sh                 # 1 node x 8 GPUs (defaults below)
#   CONFIG=configs/cc15m_prior.yaml RUN_DIR=runs/prior_k1024 OVERRIDES="prior.size=corgi-16" \
#       sbatch --nodes=2 slurm/train_cc15m_prior.sh
#   # CPU (gloo): the tiny prior
#   VQD_DEVICE=cpu CONFIG=configs/tiny_prior.yaml RUN_DIR=runs/tiny_prior OVERRIDES="shifted.clusters=..." \
#       sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=2 slurm/train_cc15m_prior.sh
#
# Fit the mixture first (tools/fit_prior_clusters.py, see configs/cc15m_prior.yaml). Environment (all
# optional) as slurm/train_laion.sh: CONFIG, RUN_DIR, OVERRIDES, VQD_DEVICE, GPUS_PER_NODE, TASKS_PER_NODE,
# PYTHON, MASTER_PORT — see slurm/common.sh.
#
#SBATCH --job-name=vqd-cc15m-prior
#SBATCH --nodes=1                 # the 2048-wide prior fits data-parallel on one node; --nodes=N to scale
#SBATCH --ntasks-per-node=8       # one task per GPU
#SBATCH --gpus-per-node=8         # --gpus-per-node=0 on CPU-only clusters
#SBATCH --cpus-per-task=10        # data-loader workers + the training thread
#SBATCH --time=24:00:00           # requeue carries the run past this limit
#SBATCH --signal=B:USR2@180       # to this shell 180 s before the limit: checkpoint, then requeue
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
export CONFIG="${CONFIG:-configs/cc15m_prior.yaml}"
# exec keeps this shell's PID, so the scheduler's USR2 reaches train_laion.sh's handler
exec bash "${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train_laion.sh"
