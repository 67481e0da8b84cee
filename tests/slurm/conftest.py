"""A real local SLURM cluster (2 emulated nodes) for the tests in this folder.

The cluster is started once per session by tools/local_slurm.py (which apt-installs slurm + munge
when missing) and stopped at the end; only the daemons it started are ended. If it cannot be
installed or started, every test here errors with the reason: CI must really run them.
"""
from __future__ import annotations

import pytest

from slurm_helpers import Cluster, LocalSlurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    """Start the 2-node local cluster once for the session; stop exactly what was started."""
    root = tmp_path_factory.mktemp("slurm")
    slurm = LocalSlurm(root / "cluster", num_nodes=2, cpus=6)
    try:
        slurm.start()
    except Exception:
        slurm.stop()
        raise
    try:
        yield Cluster(slurm, root)
    finally:
        slurm.stop()  # cancels our jobs first, so slurmstepd reaps their processes before the daemons go
