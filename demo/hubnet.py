"""A WireGuard hub in its own network namespace, reachable from this host over a veth pair.

This stands in for the federation's hub machine with a public address: root builds it, jobs
(non-root, in the root namespace) dial its veth address over UDP. Only addresses inside the
namespace we create are used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]


@dataclass
class HubNet:
    ns: str = "hpcfed-demo-hub"
    veth: str = "vhfdemo"
    iface: str = "wgfeddemo"
    subnet: str = "10.196.7"
    state_dir: str = "/var/tmp/hpcfed-demo/hub"

    @property
    def hub_ip(self) -> str:
        return f"{self.subnet}.2"

    @property
    def endpoint(self) -> str:
        return f"{self.hub_ip}:51820"

    def _sh(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def create(self) -> None:
        self.destroy(keep_state=True)
        self._sh("ip", "netns", "add", self.ns)
        self._sh(
            "ip", "link", "add", self.veth + "a", "type", "veth", "peer", "name", self.veth + "b"
        )
        self._sh("ip", "link", "set", self.veth + "b", "netns", self.ns)
        self._sh("ip", "addr", "add", f"{self.subnet}.1/30", "dev", self.veth + "a")
        self._sh("ip", "link", "set", self.veth + "a", "up")
        self._sh("ip", "-n", self.ns, "addr", "add", f"{self.hub_ip}/30", "dev", self.veth + "b")
        self._sh("ip", "-n", self.ns, "link", "set", self.veth + "b", "up")
        self._sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)

    def hub(self, *args: str) -> subprocess.CompletedProcess:
        """`hpcfed hub ...` as root inside the hub's namespace."""
        env = dict(os.environ, HPCFED_HUB_DIR=self.state_dir)
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns, *HPCFED, "hub", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"hpcfed hub {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def destroy(self, keep_state: bool = False) -> None:
        self._sh("ip", "netns", "exec", self.ns, "ip", "link", "del", self.iface, check=False)
        # wireguard-go keeps running until its interface is gone; its socket name is global.
        self._sh("pkill", "-f", f"wireguard-go.*{self.iface}", check=False)
        self._sh("ip", "netns", "del", self.ns, check=False)
        self._sh("ip", "link", "del", self.veth + "a", check=False)
        if not keep_state:
            subprocess.run(["rm", "-rf", self.state_dir])
