"""What the Flower and Fed-BioMed demos share: the researcher's own directories and hpcfed calls,
a state file, the local test cluster, the hub in its namespace, tunnel peers made where used.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar, Optional

from demo.federation import USER, say, sh
from demo.hubnet import HPCFED, HubNet

SLURM_CONF = "/var/lib/hpcfed/testcluster/etc/slurm.conf"


class DemoUser:
    """The demo's researcher (USER), with XDG directories of this demo's own under ~/DIRNAME,
    so no run sees what another demo or an earlier run left."""

    def __init__(self, dirname: str):
        self.dirname = dirname

    @property
    def root(self) -> Path:
        return Path(pwd.getpwnam(USER).pw_dir) / self.dirname

    def env(self) -> dict:
        root = self.root / "xdg"
        return {
            f"XDG_{k.upper()}_HOME": str(root / k) for k in ("config", "data", "state", "cache")
        }

    def hpcfed(self, *args, check: bool = True, timeout: float = 600, env: Optional[dict] = None):
        return sh(
            HPCFED + list(args),
            user=USER,
            env={**self.env(), **(env or {})},
            check=check,
            timeout=timeout,
        )

    def hpcfed_json(self, *args, **kw):
        return json.loads(self.hpcfed(*args, "--json", **kw).stdout)

    def make_dirs(self, *extra: Path) -> None:
        sh(["mkdir", "-p", str(self.root), *map(str, extra), *self.env().values()], user=USER)

    def write_profiles(self, profiles: dict) -> None:
        """Site profiles (name -> YAML text) in the user's own config directory."""
        sites = Path(self.env()["XDG_CONFIG_HOME"]) / "hpcfed" / "sites"
        sh(["mkdir", "-p", str(sites)], user=USER)
        for site, text in profiles.items():
            subprocess.run(
                ["runuser", "-u", USER, "--", "tee", str(sites / f"{site}.yaml")],
                input=text, capture_output=True, text=True, check=True,
            )  # fmt: skip

    def make_peer(self, hub: HubNet, type_: str, peer: str) -> tuple:
        """A tunnel peer as a site makes one: the hub's config file, the key pair made by the
        user (only the public key goes back to the hub). Returns (tunnel address, public key)."""
        info = json.loads(hub.hub("genconf", type_, peer, "--json").stdout)
        conf = self.root / f"{peer}.wg.conf"
        shutil.copy(info["config"], conf)
        shutil.chown(conf, USER, USER)
        os.chmod(conf, 0o600)
        pub = self.hpcfed_json("vpn", "keygen", "--config", str(conf), "--force")["public_key"]
        hub.hub("add", type_, peer, pub)
        return info["address"].split("/")[0], pub


class SavedState:
    """A demo's state (a dataclass) in STATE_DIR/state.json, replaced whole on each save."""

    state_dir: ClassVar[Path]

    @classmethod
    def load(cls):
        try:
            return cls(**json.loads((cls.state_dir / "state.json").read_text()))
        except FileNotFoundError:
            return cls()

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, self.state_dir / "state.json")


def cluster_up() -> None:
    say("the local Slurm test cluster (hpcfed testcluster up)")
    sh(HPCFED + ["testcluster", "up"], timeout=900)
    os.environ["SLURM_CONF"] = SLURM_CONF


def hub_up(hub: HubNet) -> None:
    say(f"the WireGuard hub (wireguard-go in netns {hub.ns}, {hub.endpoint})")
    hub.create()
    hub.hub("init", "--endpoint", hub.endpoint, "--interface", hub.iface, "--keepalive", "5")
    hub.hub("up", "--userspace")
