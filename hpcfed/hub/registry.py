"""The hub's persistent registry (pure data + files): hub settings, peers, their addresses and PSKs.

Layout (dir 0700, files holding secrets 0600):
  hub.json                 interface, endpoint, listen port, hub public key, keepalive
  private.key              the hub's private key
  peers.json               every peer: type, id, address, psk, public keys
  peers/TYPE/ID/wg.conf    the config to hand to that site (no private key: the site adds its own)
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from hpcfed.errors import ConfigError, NotFound
from hpcfed.names import check_name
from hpcfed.paths import private_mkdir
from hpcfed.tunnel import keys
from hpcfed.tunnel.files import write_private

NETWORK = ipaddress.ip_network("10.220.0.0/14")
HUB_ADDRESS = ipaddress.ip_interface("10.220.0.1/14")
# Peer types -> address prefix. The federation server keeps one stable address wherever its job
# runs, so clients' forwards never change; admins are Fed-BioMed's "researcher" role.
PREFIXES = {
    "server": ipaddress.ip_network("10.220.0.0/16"),
    "client": ipaddress.ip_network("10.221.0.0/16"),
    "admin": ipaddress.ip_network("10.222.0.0/16"),
}
DEFAULT_DIR = "/var/lib/hpcfed/hub"


def hub_dir(explicit: Optional[str] = None) -> Path:
    return Path(explicit or os.environ.get("HPCFED_HUB_DIR") or DEFAULT_DIR)


@dataclass
class Peer:
    type: str
    id: str
    address: str
    psk: str = field(repr=False)
    keys: list = field(default_factory=list)

    def public(self) -> dict:
        return {
            "type": self.type,
            "id": self.id,
            "address": self.address,
            "prefix": str(PREFIXES[self.type]),
            "keys": list(self.keys),
        }


@dataclass
class Hub:
    interface: str
    endpoint: str
    listen_port: int
    public_key: str
    keepalive: int


def check_type_id(type_: str, id_: str) -> None:
    if type_ not in PREFIXES:
        raise ConfigError(f"peer type {type_!r} is unknown; use one of: {', '.join(PREFIXES)}")
    check_name("peer id", id_)


class Registry:
    def __init__(self, directory: Path):
        self.dir = directory

    # --- hub ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.dir / "hub.json").is_file()

    def init(
        self, endpoint: str, interface: str, listen_port: int, keepalive: int, force: bool
    ) -> Hub:
        if self.exists() and not force:
            raise ConfigError(
                f"{self.dir}: a hub is already initialised here (use --force to replace its key)"
            )
        private_mkdir(self.dir)
        private = keys.generate_private()
        write_private(self.dir / "private.key", private + "\n")
        hub = Hub(interface, endpoint, listen_port, keys.public_from_private(private), keepalive)
        write_private(self.dir / "hub.json", json.dumps(asdict(hub), indent=2) + "\n")
        if not (self.dir / "peers.json").exists():
            self._save_peers([])
        return hub

    def hub(self) -> Hub:
        try:
            return Hub(**json.loads((self.dir / "hub.json").read_text()))
        except FileNotFoundError:
            raise NotFound(
                f"{self.dir}: no hub here; run `hpcfed hub init --endpoint HOST:PORT` first"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.dir / 'hub.json'}: unreadable ({exc})") from None

    def private_key(self) -> str:
        return (self.dir / "private.key").read_text().strip()

    # --- peers -------------------------------------------------------------------------------
    def peers(self) -> list[Peer]:
        self.hub()
        try:
            return [Peer(**p) for p in json.loads((self.dir / "peers.json").read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.dir / 'peers.json'}: unreadable ({exc})") from None

    def _save_peers(self, peers: list[Peer]) -> None:
        write_private(
            self.dir / "peers.json", json.dumps([asdict(p) for p in peers], indent=2) + "\n"
        )

    def get(self, type_: str, id_: str) -> Peer:
        check_type_id(type_, id_)
        for p in self.peers():
            if p.type == type_ and p.id == id_:
                return p
        raise NotFound(
            f"no peer {type_} {id_} in {self.dir}; create its config with `hpcfed hub genconf {type_} {id_}`"
        )

    def conf_path(self, type_: str, id_: str) -> Path:
        return self.dir / "peers" / type_ / id_ / "wg.conf"

    def genconf(self, type_: str, id_: str) -> tuple[Peer, Path]:
        check_type_id(type_, id_)
        hub = self.hub()
        peers = self.peers()
        if any(p.type == type_ and p.id == id_ for p in peers):
            raise ConfigError(
                f"peer {type_} {id_} already has a config ({self.conf_path(type_, id_)}); `hpcfed hub removeconf {type_} {id_}` first"
            )
        used = {ipaddress.ip_address(p.address) for p in peers} | {HUB_ADDRESS.ip}
        net = PREFIXES[type_]
        address = next(
            (ip for ip in net.hosts() if ip not in used and int(ip) & 0xFF not in (0, 255)), None
        )
        if address is None:
            raise ConfigError(f"no free address left in {net} for type {type_}")
        peer = Peer(type_, id_, str(address), keys.generate_psk(), [])
        path = self.conf_path(type_, id_)
        private_mkdir(path.parent)
        write_private(path, render_peer_config(hub, peer))
        self._save_peers(peers + [peer])
        return peer, path

    def add_key(self, type_: str, id_: str, public_key: str) -> tuple[Peer, list[str]]:
        """Register the site's public key; returns the peer and the keys it replaced.

        An address routes to exactly one key in WireGuard, so a new key replaces the old one
        (a site that re-generated its key pair re-registers with `add`)."""
        if not keys.is_key(public_key):
            raise ConfigError(f"public key {public_key!r} is not a base64 WireGuard key")
        peers = self.peers()
        peer = self.get(type_, id_)
        for other in peers:
            if public_key in other.keys and (other.type, other.id) != (type_, id_):
                raise ConfigError(f"key {public_key} already belongs to {other.type} {other.id}")
        replaced = [k for k in peer.keys if k != public_key]
        peer.keys = [public_key]
        self._replace(peers, peer)
        return peer, replaced

    def remove_keys(self, type_: str, id_: str) -> Peer:
        peers = self.peers()
        peer = self.get(type_, id_)
        removed = Peer(**asdict(peer))
        peer.keys = []
        self._replace(peers, peer)
        return removed

    def removeconf(self, type_: str, id_: str) -> Peer:
        peers = self.peers()
        peer = self.get(type_, id_)
        self._save_peers([p for p in peers if (p.type, p.id) != (type_, id_)])
        path = self.conf_path(type_, id_)
        if path.exists():
            path.unlink()
        for d in (path.parent, path.parent.parent):
            try:
                d.rmdir()
            except OSError:
                pass
        return peer

    def _replace(self, peers: list[Peer], peer: Peer) -> None:
        self._save_peers([peer if (p.type, p.id) == (peer.type, peer.id) else p for p in peers])


def render_peer_config(hub: Hub, peer: Peer) -> str:
    """The WireGuard config a site receives. The private key is added where the tunnel runs."""
    return (
        f"# hpcfed peer config: {peer.type} {peer.id}, hub {hub.endpoint}\n"
        f"# Add this peer's private key where its tunnel will run, then send back the public key:\n"
        f"#   hpcfed vpn keygen --config THIS_FILE     (prints the public key for `hpcfed hub add`)\n"
        f"[Interface]\n"
        f"Address = {peer.address}/32\n"
        f"\n"
        f"[Peer]\n"
        f"PublicKey = {hub.public_key}\n"
        f"PresharedKey = {peer.psk}\n"
        f"Endpoint = {hub.endpoint}\n"
        f"AllowedIPs = {NETWORK}\n"
        f"PersistentKeepalive = 25\n"
    )
