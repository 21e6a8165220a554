"""What the local test cluster looks like: one immutable description, rendered into config files.

The defaults mimic a small GPU site: three nodes, each with four typed A40 GPUs (fake, backed by
real character devices), a default partition, and a preemptable/high-priority partition pair.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

DEFAULT_PREFIX = "/var/lib/hpcfed/testcluster"
# Debian packages the cluster runs from (bookworm: Slurm 22.05).
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")


@dataclass(frozen=True)
class ClusterSpec:
    prefix: str = DEFAULT_PREFIX
    cluster_name: str = "hpcfed"
    nodes: int = 3
    cpus_per_node: int = 8
    memory_mb_per_node: int = 3000
    gpu_type: str = "a40"
    gpus_per_node: int = 4
    slurmctld_port: int = 6817
    slurmdbd_port: int = 6819
    mariadb_port: int = 13306
    slurmd_base_port: int = 17001
    user: str = "hpcuser"
    account: str = "fedlab"
    grace_time_s: int = 10
    extra_users: tuple = field(default_factory=tuple)

    @classmethod
    def from_env(cls, prefix: str | None = None) -> ClusterSpec:
        return cls(prefix=prefix or os.environ.get("HPCFED_TESTCLUSTER_PREFIX") or DEFAULT_PREFIX)

    # Paths derived from the prefix; every file of the cluster lives below it.
    def path(self, *parts: str) -> str:
        return os.path.join(self.prefix, *parts)

    @property
    def slurm_conf(self) -> str:
        return self.path("etc", "slurm.conf")

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def slurmd_port(self, index: int) -> int:
        return self.slurmd_base_port + index

    def ports(self) -> dict[str, int]:
        """Every TCP port the cluster listens on, by the daemon that owns it."""
        ports = {
            "mariadb": self.mariadb_port,
            "slurmdbd": self.slurmdbd_port,
            "slurmctld": self.slurmctld_port,
        }
        for i, node in enumerate(self.node_names):
            ports[f"slurmd {node}"] = self.slurmd_port(i)
        return ports

    def env(self) -> dict[str, str]:
        """What a Slurm client needs to reach this cluster."""
        return {"SLURM_CONF": self.slurm_conf}

    def to_dict(self) -> dict:
        return asdict(self)
