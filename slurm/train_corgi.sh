#!/bin/bash
# The Corgi system on SLURM: submits the CC15M shifted prior, the LAION decoder and a chain-eval watcher.
# Run it on the login node (it calls sbatch; it is not a batch script itself), from the repository root:
#
#   mkdir -p logs && bash slurm/train_corgi.sh                      # the recipe below, defaults
#   PRIOR_OVERRIDES="prior.size=corgi-16" DECODER_SBATCH="--nodes=8" bash slurm/train_corgi.sh
#   VQD_DRY_RUN=1 bash slurm/train_corgi.sh                        # check both configs, print the sbatch lines
#
# Jobs (each with the conventions of slurm/common.sh: requeue on pre-emption / time limit, `--resume auto`,
# one ERROR line and exit 2 on a bad parameter; vqd-train's run lock keeps a second job off a run directory,
# the evaluator's per-checkpoint claim keeps two watchers from evaluating one checkpoint twice):
#   prior    slurm/train_cc15m_prior.sh with CONFIG=$PRIOR_CONFIG RUN_DIR=$PRIOR_RUN OVERRIDES=$PRIOR_OVERRIDES
#   decoder  slurm/train_laion.sh with CONFIG=$DECODER_CONFIG RUN_DIR=$DECODER_RUN OVERRIDES=$DECODER_OVERRIDES
#   eval     slurm/eval.sh EVAL_MODE=watch on $DECODER_RUN with eval.prior_run=$PRIOR_RUN: every new complete
#            decoder checkpoint from the held-out true embeddings and through the chain (text → prior → decoder).
#            The evaluator loads the prior's newest complete checkpoint once, when it starts, so the watcher
#            begins after the prior job has started and $EVAL_BEGIN later (default now+2hours: the prior saves
#            every 30 min); resubmit it (slurm/eval.sh) to evaluate against a newer prior.
#
# Environment (all optional): PRIOR_CONFIG (configs/cc15m_prior.yaml), PRIOR_RUN (its run_dir), PRIOR_OVERRIDES,
# DECODER_CONFIG (configs/laion_decoder.yaml), DECODER_RUN, DECODER_OVERRIDES, EVAL_ARGS (extra vqd-eval
# arguments), EVAL_BEGIN, PRIOR_SBATCH / DECODER_SBATCH / EVAL_SBATCH (extra sbatch flags, split like a command
# line), VQD_DRY_RUN=1, PYTHON; the jobs also read VQD_DEVICE, GPUS_PER_NODE, ... (slurm/common.sh).
# Both configs and their overrides are checked before anything is queued. Both must use the same CLIP
# (decoder.embed_dim = prior.embed_dim; the chain evaluation refuses a mismatch).

set -euo pipefail
source "${VQD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
cd "$VQD_ROOT"

PRIOR_CONFIG="${PRIOR_CONFIG:-configs/cc15m_prior.yaml}"
DECODER_CONFIG="${DECODER_CONFIG:-configs/laion_decoder.yaml}"
EVAL_BEGIN="${EVAL_BEGIN:-now+2hours}"
for c in "$PRIOR_CONFIG" "$DECODER_CONFIG"; do
    [[ -f "$c" ]] || vqd_die "$c does not exist (paths are relative to $VQD_ROOT)"
done

# run directory of CONFIG with OVERRIDES (and RUN_DIR): jobargs' check, so a bad value stops here
run_dir_of() {  # CONFIG RUN_DIR OVERRIDES
    (export CONFIG="$1" RUN_DIR="$2" OVERRIDES="$3" OVERRIDES_FILE=""; vqd_jobargs train "$1"; echo "${VQD_WORDS[0]}")
}
PRIOR_RUN="$(run_dir_of "$PRIOR_CONFIG" "${PRIOR_RUN:-}" "${PRIOR_OVERRIDES:-}")" || exit 2
DECODER_RUN="$(run_dir_of "$DECODER_CONFIG" "${DECODER_RUN:-}" "${DECODER_OVERRIDES:-}")" || exit 2
# the words of the environment variable NAME, split like a command line (no Python start when it is empty)
split_env() { if [[ -n "${!1:-}" ]]; then vqd_jobargs split "$1"; else VQD_WORDS=(); fi; }
split_env EVAL_ARGS; EARGS=("${VQD_WORDS[@]}")
split_env PRIOR_SBATCH; PSB=("${VQD_WORDS[@]}")
split_env DECODER_SBATCH; DSB=("${VQD_WORDS[@]}")
split_env EVAL_SBATCH; ESB=("${VQD_WORDS[@]}")
# EVAL_ARGS travels to eval.sh as one string: quote each word again so it splits back the same
EVAL_WORDS="$(printf '%q ' --wait-for-run 86400 "eval.prior_run=$PRIOR_RUN" "${EARGS[@]}")"

# sbatch ENV... -- FLAGS... SCRIPT: prints the job id (VQD_DRY_RUN=1: the command line, id "DRY")
submit() {
    local env=()
    while [[ "$1" != -- ]]; do env+=("$1"); shift; done
    shift
    if [[ -n "${VQD_DRY_RUN:-}" ]]; then
        echo "$(printf '%q ' "${env[@]}")sbatch $(printf '%q ' "$@")" >&2
        echo DRY
    else
        env "${env[@]}" sbatch --parsable "$@" | cut -d';' -f1
    fi
}

[[ -n "${VQD_DRY_RUN:-}" ]] || mkdir -p logs
PRIOR_JOB="$(submit CONFIG="$PRIOR_CONFIG" RUN_DIR="$PRIOR_RUN" OVERRIDES="${PRIOR_OVERRIDES:-}" OVERRIDES_FILE= \
    -- "${PSB[@]}" slurm/train_cc15m_prior.sh)"
DECODER_JOB="$(submit CONFIG="$DECODER_CONFIG" RUN_DIR="$DECODER_RUN" OVERRIDES="${DECODER_OVERRIDES:-}" \
    OVERRIDES_FILE= -- --job-name=vqd-laion-decoder "${DSB[@]}" slurm/train_laion.sh)"
EVAL_JOB="$(submit RUN_DIR="$DECODER_RUN" EVAL_MODE=watch EVAL_ARGS="$EVAL_WORDS" \
    -- --job-name=vqd-corgi-eval --dependency="after:$PRIOR_JOB" --begin="$EVAL_BEGIN" "${ESB[@]}" slurm/eval.sh)"
vqd_log "corgi: prior job $PRIOR_JOB ($PRIOR_CONFIG → $PRIOR_RUN), decoder job $DECODER_JOB" \
        "($DECODER_CONFIG → $DECODER_RUN), chain-eval watcher $EVAL_JOB (after the prior starts, $EVAL_BEGIN)"
