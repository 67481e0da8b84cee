#!/usr/bin/env bash
# One-GPU readiness check (bench/gpu_check.py): GPU name + commit, bf16 train steps of size B with and without
# activation checkpointing (samples/s, MFU, HFU, peak memory vs tools/plan.py's model), the SDPA kernel,
# sampling and a train step vs diffusers. About 3-5 minutes on one H100/H200. Extra flags go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD}"
exec python bench/gpu_check.py --device cuda "$@"
