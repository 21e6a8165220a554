"""What the Docker test cluster looks like: one immutable description per Slurm release.

One container per host, each with its own hostname and address:

- `slurmctld` (slurmctld + slurmdbd + MariaDB + munge) on the cluster network;
- `node1..3` (slurmd, typed fake GPUs, Apptainer) on the cluster network and the "internet"
  network, where a firewall inside the container lets out only UDP to the hub's WireGuard port;
- `login1`, `login2` (Slurm clients, hpcfed, sshd, cron) sharing one /home volume with the nodes
  (the NFS stand-in);
- `hub` (wireguard-go + hpcfed hub) on the "internet" network only.

Both networks are `internal`: nothing in the cluster reaches anything outside it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from hpcfed.errors import ConfigError

DEFAULT_STATE_DIR = "/var/lib/hpcfed/testcluster-docker"
# Slurm release -> Debian suite that ships it.
SUITES = {"22.05": "bookworm", "24.11": "trixie"}
# Where hpcfed's `local` site profile looks for slurm.conf: the same path inside the containers,
# so `hpcfed submit --site local` on a login node works unchanged.
SLURM_ETC = "/var/lib/hpcfed/testcluster/etc"
LABEL = "org.hpcfed.testcluster"


@dataclass(frozen=True)
class DockerClusterSpec:
    slurm: str = "22.05"
    state_dir: str = DEFAULT_STATE_DIR
    cluster_name: str = "hpcfed"
    nodes: int = 3
    logins: int = 2
    cpus_per_node: int = 4
    memory_mb_per_node: int = 2000
    gpu_type: str = "a40"
    gpus_per_node: int = 4
    wireguard_port: int = 51820
    slurmctld_port: int = 6817
    slurmd_port: int = 6818
    user: str = "hpcuser"
    account: str = "fedlab"
    grace_time_s: int = 10
    # A stopped node is DOWN (and its jobs NODE_FAIL) this many seconds after its last answer.
    slurmd_timeout_s: int = 20

    def __post_init__(self):
        if self.slurm not in SUITES:
            raise ConfigError(
                f"--slurm {self.slurm}: unknown Slurm release; choose one of {', '.join(SUITES)}"
            )

    @classmethod
    def from_env(cls, slurm: str | None = None, state_dir: str | None = None) -> DockerClusterSpec:
        return cls(
            slurm=slurm or os.environ.get("HPCFED_TESTCLUSTER_SLURM") or "22.05",
            state_dir=state_dir
            or os.environ.get("HPCFED_TESTCLUSTER_DOCKER_DIR")
            or DEFAULT_STATE_DIR,
        )

    @property
    def suite(self) -> str:
        return SUITES[self.slurm]

    @property
    def tag(self) -> str:
        return self.slurm.replace(".", "")

    @property
    def project(self) -> str:
        """The compose project name: containers, networks and volumes are named after it."""
        return f"hpcfed-tc{self.tag}"

    @property
    def compose_dir(self) -> str:
        return os.path.join(self.state_dir, self.slurm)

    # Each release gets its own subnets, so both clusters can run side by side.
    def _net(self, which: int) -> str:
        return f"10.{230 + which}.{int(self.tag) % 250}"

    @property
    def cluster_subnet(self) -> str:
        return self._net(0) + ".0/24"

    @property
    def internet_subnet(self) -> str:
        return self._net(1) + ".0/24"

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def login_names(self) -> list[str]:
        return [f"login{i}" for i in range(1, self.logins + 1)]

    def cluster_ip(self, host: str) -> str:
        """Fixed addresses: slurm.conf and the firewall rules name them."""
        if host == "slurmctld":
            return self._net(0) + ".10"
        if host.startswith("node"):
            return self._net(0) + f".{20 + int(host[4:])}"
        if host.startswith("login"):
            return self._net(0) + f".{40 + int(host[5:])}"
        raise KeyError(host)

    def internet_ip(self, host: str) -> str:
        if host == "hub":
            return self._net(1) + ".10"
        if host.startswith("node"):
            return self._net(1) + f".{20 + int(host[4:])}"
        if host.startswith("login"):
            return self._net(1) + f".{40 + int(host[5:])}"
        raise KeyError(host)

    @property
    def internet_gateway_ip(self) -> str:
        """The Docker host's own address on the "internet" network (a service run on the host
        there, e.g. the tests' NVFlare dashboard, is on the hub's side of the cluster)."""
        return self._net(1) + ".1"

    @property
    def hub_ip(self) -> str:
        return self.internet_ip("hub")

    @property
    def hosts(self) -> list[str]:
        return ["slurmctld", *self.node_names, *self.login_names, "hub"]

    def container(self, host: str) -> str:
        return f"{self.project}-{host}"

    def to_dict(self) -> dict:
        return asdict(self)
