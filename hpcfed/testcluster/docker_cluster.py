"""The Docker test cluster: build (or reuse) the image, write the compose recipe, run it.

`up` runs the very docker-compose.yml that `hpcfed testcluster compose` writes. `down` removes
the containers, networks and volumes carrying this cluster's label and nothing else; it is safe
to run twice. Every Slurm command runs inside a container (`exec`): the host needs no Slurm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable, Optional, Sequence

from hpcfed.errors import EnvironmentProblem, HpcfedError
from hpcfed.testcluster import docker_compose
from hpcfed.testcluster.docker_images import ImageBuilder
from hpcfed.testcluster.docker_spec import LABEL, DockerClusterSpec

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) when present, else the standalone `docker-compose`."""
    if shutil.which("docker") is None:
        raise EnvironmentProblem("docker is not installed: the docker engine needs Docker Engine")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise EnvironmentProblem("neither `docker compose` nor `docker-compose` is installed")


def docker_ok() -> None:
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise EnvironmentProblem(
            f"the Docker daemon does not answer: {(proc.stderr or '').strip()[:200]}"
        )


class DockerCluster:
    __test__ = False

    def __init__(self, spec: DockerClusterSpec, progress: Progress = _quiet):
        self.spec = spec
        self.progress = progress
        self.images = ImageBuilder(spec, progress)

    # ---- plumbing
    @property
    def compose_file(self) -> str:
        return os.path.join(self.spec.compose_dir, "docker-compose.yml")

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        argv = [*compose_command(), "-p", self.spec.project, "-f", self.compose_file, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise HpcfedError(f"{' '.join(argv[:2])} {args[0]} failed: {' | '.join(lines[-3:])}")
        return proc

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        user: Optional[str] = None,
        input: Optional[str] = None,
        timeout: float = 120,
        env: Optional[dict] = None,
    ) -> subprocess.CompletedProcess:
        """Run argv on one host of the cluster (as `user` through runuser, with a login HOME)."""
        cmd = ["docker", "exec"]
        if input is not None:
            cmd.append("-i")
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        if user is not None:
            cmd += ["-e", f"HOME=/home/{user}", "-e", f"USER={user}", "-w", "/"]
            argv = ["runuser", "-u", user, "--", *argv]
        cmd += [self.spec.container(host), *argv]
        return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)

    def write_recipe(self, out: Optional[str] = None) -> tuple[str, list[str]]:
        out = out or self.spec.compose_dir
        return out, docker_compose.write(self.spec, self.images.tag(), out)

    # ---- up
    def up(self) -> dict:
        t0 = time.monotonic()
        docker_ok()
        image = self.images.ensure()
        t_images = time.monotonic() - t0
        self.write_recipe()
        self.progress(f"starting {len(self.spec.hosts)} containers ({self.spec.project})")
        t1 = time.monotonic()
        self.compose("up", "-d", "--remove-orphans")
        self.wait_ready()
        self.wait_nodes_idle()
        return {
            "engine": "docker",
            "slurm": self.spec.slurm,
            "project": self.spec.project,
            "image": image,
            "compose_file": self.compose_file,
            "image_seconds": round(t_images, 1),
            "image_timings": self.images.timings,
            "start_seconds": round(time.monotonic() - t1, 1),
            "seconds": round(time.monotonic() - t0, 1),
            "hosts": {h: self.spec.container(h) for h in self.spec.hosts},
        }

    def wait_ready(self, hosts: Optional[Sequence[str]] = None, timeout: float = 180) -> None:
        pending = list(hosts or self.spec.hosts)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            pending = [
                h
                for h in pending
                if self.exec(h, ["test", "-e", "/run/hpcfed-node.ready"], timeout=30).returncode
            ]
            if pending:
                for h in pending:
                    if self.container_state(h) not in ("running", "restarting"):
                        raise EnvironmentProblem(
                            f"container {self.spec.container(h)} exited while starting: "
                            f"{self.logs_tail(h)}"
                        )
                time.sleep(1)
        if pending:
            raise EnvironmentProblem(
                f"not ready after {timeout:.0f} s: {', '.join(pending)}; "
                f"{self.logs_tail(pending[0])}"
            )

    def logs_tail(self, host: str, lines: int = 5) -> str:
        proc = subprocess.run(
            ["docker", "logs", "--tail", str(lines), self.spec.container(host)],
            capture_output=True,
            text=True,
        )
        return " | ".join((proc.stdout + proc.stderr).strip().splitlines())

    def container_state(self, host: str) -> str:
        proc = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Status}}", self.spec.container(host)],
            capture_output=True,
            text=True,
        )
        return proc.stdout.strip() if proc.returncode == 0 else "absent"

    def node_states(self) -> dict[str, str]:
        proc = self.exec("slurmctld", ["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def wait_nodes_idle(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            bad = [n for n, st in states.items() if st.startswith(("down", "drain"))]
            if bad:  # left down by a fault test or an earlier run: they answer again, resume them
                self.exec(
                    "slurmctld", ["scontrol", "update", f"NodeName={','.join(bad)}", "State=RESUME"]
                )
            if set(states) == set(self.spec.node_names) and all(
                st.rstrip("*") in ("idle", "mixed", "allocated") and not st.endswith("*")
                for st in states.values()
            ):
                return
            time.sleep(1)
        raise EnvironmentProblem(f"nodes not idle after {timeout:.0f} s: {states}")

    # ---- down
    def down(self) -> dict:
        """Remove what this cluster created (by its label); nothing else. Safe twice.
        Reports what was there before (compose removes most of it, the rest goes by label)."""
        docker_ok()
        selector = f"label={LABEL}={self.spec.project}"
        kinds = (
            ("containers", ["docker", "ps", "-aq"], ["docker", "rm", "-f", "-v"]),
            ("networks", ["docker", "network", "ls", "-q"], ["docker", "network", "rm"]),
            ("volumes", ["docker", "volume", "ls", "-q"], ["docker", "volume", "rm", "-f"]),
        )

        def listed(ls: list[str]) -> list[str]:
            out = subprocess.run([*ls, "--filter", selector], capture_output=True, text=True)
            return out.stdout.split()

        removed = {kind: listed(ls) for kind, ls, _ in kinds}
        if os.path.exists(self.compose_file):
            try:
                self.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=300)
            except HpcfedError:
                pass  # what compose could not remove goes by label below, or is reported
        for _, ls, rm in kinds:
            left = listed(ls)
            if left:
                subprocess.run([*rm, *left], capture_output=True, text=True)
        # Seen after a compute node was killed mid-job: the Docker daemon keeps counting an
        # endpoint on a network no container is attached to, and refuses to remove it until
        # it restarts. `up` reuses such a network (same name and labels), so say so and go on.
        stuck = listed(kinds[1][1])
        if any(listed(ls) for kind, ls, _ in kinds if kind != "networks"):
            raise HpcfedError(
                f"docker test cluster {self.spec.project}: could not remove all of it"
            )
        removed["networks"] = [n for n in removed["networks"] if n not in stuck]
        removed["stuck_networks"] = stuck
        return removed

    # ---- status
    def _labelled(self, kind: str) -> list[dict]:
        # Named fields, never `{{json .}}`: for containers that computes each one's disk size,
        # which takes minutes on fuse-overlayfs.
        ls, fields = {
            "container": (["docker", "ps", "-a"], ["Names", "State"]),
            "network": (["docker", "network", "ls"], ["Name"]),
            "volume": (["docker", "volume", "ls"], ["Name"]),
        }[kind]
        fmt = "\t".join("{{." + f + "}}" for f in fields)
        out = subprocess.run(
            [*ls, "--format", fmt, "--filter", f"label={LABEL}={self.spec.project}"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        return [dict(zip(fields, line.split("\t"))) for line in out.splitlines() if line.strip()]

    def status(self) -> dict:
        docker_ok()
        containers = {c["Names"]: c for c in self._labelled("container")}
        hosts = []
        for host in self.spec.hosts:
            c = containers.get(self.spec.container(host))
            addrs = [self.spec.cluster_ip(host)] if host != "hub" else []
            if host == "hub" or host.startswith(("node", "login")):
                addrs.append(self.spec.internet_ip(host))
            hosts.append(
                {
                    "host": host,
                    "container": self.spec.container(host),
                    "state": c["State"] if c else "absent",
                    "addresses": addrs,
                }
            )
        up = all(h["state"] == "running" for h in hosts)
        return {
            "engine": "docker",
            "slurm": self.spec.slurm,
            "suite": self.spec.suite,
            "project": self.spec.project,
            "compose_file": self.compose_file,
            "up": up,
            "hosts": hosts,
            "networks": [
                {"name": n["Name"], "subnet": self._subnet(n["Name"])}
                for n in self._labelled("network")
            ],
            "volumes": [v["Name"] for v in self._labelled("volume")],
            "nodes": self.node_states() if up else {},
        }

    def _subnet(self, network: str) -> str:
        proc = subprocess.run(
            [
                "docker",
                "network",
                "inspect",
                "-f",
                "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
                network,
            ],
            capture_output=True,
            text=True,
        )
        return proc.stdout.strip()
