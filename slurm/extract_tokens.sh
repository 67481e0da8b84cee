#!/bin/bash
# Pre-extract token shards: a SLURM array over input shards, one task per slice of the shards.
# Task i handles inputs j with j % SLURM_ARRAY_TASK_COUNT == i; finished shards (done-marker present)
# are skipped, so resubmitting the same array after a failure only redoes what is missing.
#
#   mkdir -p logs
#   INPUTS='/data/laion/{00000..31999}.tar' OUT=/data/laion_tok TOKENIZER=/models/vqgan_pruned SOURCE=laion \
#       sbatch --array=0-63 slurm/extract_tokens.sh
#   # afterwards (or as a dependent job) write the final manifest from all done-markers:
#   INPUTS=... OUT=... TOKENIZER=... MANIFEST_ONLY=1 sbatch --dependency=afterok:$ARRAY_JOB slurm/extract_tokens.sh
#
# Environment: INPUTS, OUT, TOKENIZER (required); SOURCE (default: the inputs' folder name), RESOLUTION
# (default: the tokenizer's), BATCH (64), WORKERS (8),
# CLIP_MODEL / CLIP_PRETRAINED (embeddings for the prior), EXTRA_ARGS, PYTHON.
#
#SBATCH --job-name=vqd-extract
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1         # --gpus-per-node=0 to extract on CPU
#SBATCH --cpus-per-task=10        # image-decoding workers + the main process
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail
: "${INPUTS:?set INPUTS to a braceexpand pattern of img2dataset shards}"
: "${OUT:?set OUT to the token-shard output directory}"
: "${TOKENIZER:?set TOKENIZER to a tokenizer directory}"
PYTHON="${PYTHON:-python}"
DEVICE=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; fi
TASK="${SLURM_ARRAY_TASK_ID:-0}"
NTASKS="${SLURM_ARRAY_TASK_COUNT:-1}"
ARGS=(--inputs "$INPUTS" --out-dir "$OUT" --tokenizer "$TOKENIZER"
      --batch-size "${BATCH:-64}" --num-workers "${WORKERS:-8}" --device "$DEVICE" --no-progress)
[[ -n "${SOURCE:-}" ]] && ARGS+=(--source "$SOURCE")
[[ -n "${RESOLUTION:-}" ]] && ARGS+=(--resolution "$RESOLUTION")
[[ -n "${CLIP_MODEL:-}" ]] && ARGS+=(--clip-model "$CLIP_MODEL")
[[ -n "${CLIP_PRETRAINED:-}" ]] && ARGS+=(--clip-pretrained "$CLIP_PRETRAINED")
if [[ -n "${MANIFEST_ONLY:-}" ]]; then
    # one task over all inputs: finished shards are skipped, leftovers extracted, the manifest rewritten
    ARGS+=(--task-index 0 --num-tasks 1 --fail-on-invalid-shard)
else
    ARGS+=(--task-index "$TASK" --num-tasks "$NTASKS")
fi
echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] extract task $TASK/$NTASKS device=$DEVICE out=$OUT"
# shellcheck disable=SC2086
exec "$PYTHON" -m vqd_scale.cli.extract "${ARGS[@]}" ${EXTRA_ARGS:-}
