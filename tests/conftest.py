"""Session fixtures for real parts. The Slurm test cluster comes up once per session."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
from helpers import hpcfed, need


@dataclass(frozen=True)
class SlurmCluster:
    prefix: str  # where the cluster's config, spool and logs live
    slurm_conf: str
    user: str  # a non-root user with an accounting association
    account: str
    env: dict = field(default_factory=dict)  # add to a command's environment to reach the cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The real local Slurm cluster (`hpcfed testcluster up`), shared by the whole session.

    Outside CI a machine that cannot run it (not root) skips the Slurm tests; in CI it fails.
    """
    need(os.geteuid() == 0, "the Slurm test cluster needs root to start its daemons")
    proc = hpcfed("testcluster", "up", "--json", timeout=900)
    need(proc.returncode == 0, f"hpcfed testcluster up failed: {proc.stderr.strip()[-2000:]}")
    info = json.loads(proc.stdout)
    cluster = SlurmCluster(
        prefix=info["prefix"],
        slurm_conf=info["slurm_conf"],
        user=info["user"],
        account=info["account"],
        env=dict(info["env"]),
    )
    os.environ.update(cluster.env)  # so every Slurm command the tests run finds the cluster
    return cluster
