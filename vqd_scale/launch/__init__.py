"""Cluster launch helpers: submitit callables (jobs.py) and the executor setup used by tools/submit.py."""
