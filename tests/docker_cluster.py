"""The Docker test cluster as a pytest fixture (imported by tests/test_docker_cluster*.py).

One cluster per Slurm release and session: `hpcfed testcluster up --engine docker --slurm R`
(images built from nothing on a fresh machine, reused afterwards), removed again with `down` when
the session moves on. Tests talk to it the way users do: commands on the login nodes, as hpcuser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import hpcfed, need

from hpcfed.testcluster.docker_cluster import DockerCluster
from hpcfed.testcluster.docker_spec import DockerClusterSpec

RELEASES = ["22.05", "24.11"]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class DockerLab:
    cluster: DockerCluster
    info: dict

    @property
    def spec(self) -> DockerClusterSpec:
        return self.cluster.spec

    @property
    def slurm(self) -> str:
        return self.spec.slurm

    @property
    def user(self) -> str:
        return self.spec.user

    def sh(self, host: str, script: str, user=None, timeout=120, env=None):
        return self.cluster.exec(host, ["bash", "-c", script], user=user, timeout=timeout, env=env)

    def root(self, host: str, *argv: str, timeout=120):
        return self.cluster.exec(host, list(argv), timeout=timeout)

    def state_env(self) -> dict:
        """A fresh hpcfed state directory on the shared /home: this test sees only its own
        deployments, from both login nodes."""
        d = f"/home/{self.user}/.t/{uuid.uuid4().hex[:8]}"
        self.cluster.exec("login1", ["install", "-d", "-o", self.user, "-m", "0700", d])
        return {"XDG_STATE_HOME": f"{d}/state", "XDG_CONFIG_HOME": f"{d}/config"}

    def hpcfed(self, host: str, *args: str, env=None, timeout=120):
        """hpcfed on a host of the cluster, as the cluster user."""
        return self.cluster.exec(host, ["hpcfed", *args], user=self.user, env=env, timeout=timeout)


def _up(release: str, say) -> DockerLab:
    need(os.geteuid() == 0, "the Docker test cluster needs root (docker, debootstrap)")
    need(shutil.which("docker") is not None, "Docker Engine is not installed")
    need(
        subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
        "the Docker daemon does not answer",
    )
    spec = DockerClusterSpec(slurm=release)
    env = {"HPCFED_SOURCE": str(REPO)}
    hpcfed("testcluster", "down", "--engine", "docker", "--slurm", release, env=env, timeout=300)
    t0 = time.monotonic()
    proc = hpcfed(
        "testcluster", "up", "--engine", "docker", "--slurm", release, "--json",
        env=env, timeout=3000,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    # In the CI log (not captured): how long the images and the containers took.
    say(
        f"docker test cluster {release}: up in {time.monotonic() - t0:.0f} s "
        f"(images {info['image_seconds']} s {info['image_timings']}, "
        f"containers {info['start_seconds']} s)"
    )
    return DockerLab(DockerCluster(spec), info)


def _down(lab: DockerLab) -> None:
    release = lab.slurm
    args = ("testcluster", "down", "--engine", "docker", "--slurm", release, "--json")
    proc = hpcfed(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # It says what it removed: every host's container, both networks, both volumes ...
    removed = json.loads(proc.stdout)
    assert len(removed["containers"]) == len(lab.spec.hosts), removed
    # (a network the Docker daemon refuses to remove is reported, not hidden)
    assert len(removed["networks"]) + len(removed["stuck_networks"]) == 2, removed
    assert len(removed["volumes"]) == 2, removed
    # ... and nothing of it is left but such a network.
    again = json.loads(hpcfed(*args, timeout=300).stdout)
    assert not again["containers"] and not again["volumes"], again
    assert again["stuck_networks"] == removed["stuck_networks"], again


@pytest.fixture(
    name="docker_lab", scope="session", params=RELEASES, ids=[f"slurm{r}" for r in RELEASES]
)
def docker_lab_fixture(request):
    """The Docker test cluster of each Slurm release in turn (pytest groups tests by release)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lab = _up(request.param, lambda line: reporter and reporter.write_line("\n" + line))
    yield lab
    _down(lab)


def wait_for(what, predicate, timeout=120, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})")
