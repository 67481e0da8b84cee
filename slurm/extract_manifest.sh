#!/bin/bash
# The final manifest.json of a token-extraction array, written once after every task has ended: one
# pass over all inputs that skips finished shards (done-marker present), extracts any left over, fails
# on an invalid shard, and writes manifest.json from every done-marker. Each array task also rewrites
# the manifest when it ends, but tasks ending together can miss each other's shards; this one cannot.
#
#   export INPUTS='/data/laion/{00000..31999}.tar' OUT=/data/laion_tok TOKENIZER=/models/vqgan_pruned SOURCE=laion
#   ARRAY=$(sbatch --parsable --array=0-63 slurm/extract_tokens.sh)
#   sbatch --dependency=afterok:$ARRAY slurm/extract_manifest.sh
#
# Environment: as slurm/extract_tokens.sh (the same INPUTS, OUT, TOKENIZER, SOURCE, RESOLUTION, ...).
#
#SBATCH --job-name=vqd-extract-manifest
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=0         # normally nothing is left to extract; a leftover shard decodes on CPU
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out   # one job, not an array: no %a in its log name

set -euo pipefail
export MANIFEST_ONLY=1
exec bash "${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/extract_tokens.sh"
