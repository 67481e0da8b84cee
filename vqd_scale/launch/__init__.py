"""Cluster launch helpers: submitit callables (jobs.py) and the executor setup used by tools/submit.py."""

# DeepSpeed's JIT-compiled CPU ops (minutes to build) are cached here by every launcher: slurm/common.sh
# exports the same path (tests/slurm checks they agree), so no job type compiles them again.
TORCH_EXTENSIONS_DIR = "~/.cache/vqd_scale/torch_extensions"
