#!/bin/bash
# Pre-extract token shards: a SLURM array over input shards, one task per slice of the shards.
# Task i handles inputs j with j % SLURM_ARRAY_TASK_COUNT == i; finished shards (done-marker present)
# are skipped, so resubmitting the same array after a failure only redoes what is missing.
#
#   mkdir -p logs
#   export INPUTS='/data/laion/{00000..31999}.tar' OUT=/data/laion_tok TOKENIZER=/models/vqgan_pruned SOURCE=laion
#   ARRAY=$(sbatch --parsable --array=0-63 slurm/extract_tokens.sh)
#   # the final manifest.json, once every task has ended (each task also rewrites it when it ends, but
#   # tasks ending together can miss each other's shards): one job over all done-markers
#   sbatch --dependency=afterok:$ARRAY slurm/extract_manifest.sh
#   # CPU-only nodes: no GPU, decoding workers = --cpus-per-task - 1
#   ARRAY=$(sbatch --parsable --array=0-63 --gpus-per-node=0 --cpus-per-task=4 slurm/extract_tokens.sh)
#
# Environment: INPUTS, OUT, TOKENIZER (required); SOURCE (default: the inputs' folder name), RESOLUTION
# (default: the tokenizer's), BATCH (64), WORKERS (decoding
# processes; default: the job's CPUs per task - 1), CLIP_MODEL / CLIP_PRETRAINED (embeddings for the prior),
# EXTRA_ARGS, PYTHON; MANIFEST_ONLY=1 (what slurm/extract_manifest.sh sets).
#
#SBATCH --job-name=vqd-extract
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1         # --gpus-per-node=0 on CPU-only nodes (a GPU request never fits there)
#SBATCH --cpus-per-task=10        # image-decoding workers + the main process (WORKERS follows it)
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
# decoding workers: what this job was given besides the main process (0: decode in the main process)
CPUS="${SLURM_CPUS_PER_TASK:-1}"
WORKERS="${WORKERS:-$(( CPUS > 1 ? CPUS - 1 : 0 ))}"
ARGS=(--inputs "$INPUTS" --out-dir "$OUT" --tokenizer "$TOKENIZER"
      --batch-size "${BATCH:-64}" --num-workers "$WORKERS" --device "$DEVICE" --no-progress)
[[ -n "${SOURCE:-}" ]] && ARGS+=(--source "$SOURCE")
[[ -n "${RESOLUTION:-}" ]] && ARGS+=(--resolution "$RESOLUTION")
[[ -n "${CLIP_MODEL:-}" ]] && ARGS+=(--clip-model "$CLIP_MODEL")
[[ -n "${CLIP_PRETRAINED:-}" ]] && ARGS+=(--clip-pretrained "$CLIP_PRETRAINED")
if [[ -n "${MANIFEST_ONLY:-}" ]]; then
    # one task over all inputs: finished shards are skipped, leftovers extracted, the manifest rewritten
    TASK=0 NTASKS=1
    ARGS+=(--task-index 0 --num-tasks 1 --fail-on-invalid-shard)
else
    ARGS+=(--task-index "$TASK" --num-tasks "$NTASKS")
fi
echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] extract task $TASK/$NTASKS device=$DEVICE workers=$WORKERS out=$OUT"
# shellcheck disable=SC2086
exec "$PYTHON" -m vqd_scale.cli.extract "${ARGS[@]}" ${EXTRA_ARGS:-}
