"""Read a standard WireGuard config file (the subset a userspace peer with one hub uses).

`[Interface]` PrivateKey, Address (IPv4 CIDR), ListenPort, MTU; one `[Peer]` (the hub)
PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive. wg-quick-only keys that make
no sense without a TUN device (DNS, Table, PostUp, ...) are accepted and ignored; anything else
is an error naming the file, line and key. The file holds a private key, so it must be 0600.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from hpcfed.errors import ConfigError
from hpcfed.tunnel.keys import is_key

INTERFACE_KEYS = {"privatekey", "address", "listenport", "mtu"}
PEER_KEYS = {"publickey", "presharedkey", "endpoint", "allowedips", "persistentkeepalive"}
IGNORED_KEYS = {"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"}


@dataclass(frozen=True)
class TunnelConfig:
    path: str
    private_key: str = field(repr=False)
    address: ipaddress.IPv4Interface
    peer_public_key: str
    endpoint: str
    allowed_ips: tuple[ipaddress.IPv4Network, ...]
    preshared_key: Optional[str] = field(default=None, repr=False)
    keepalive: Optional[int] = None
    listen_port: Optional[int] = None
    mtu: int = 1420

    @property
    def endpoint_host(self) -> str:
        return self.endpoint.rsplit(":", 1)[0].strip("[]")

    @property
    def endpoint_port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])


def parse_endpoint(value: str, where: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: Endpoint must be HOST:PORT, got {value!r}")
    return value


def _sections(text: str, path: str) -> Iterator[dict[str, Any]]:
    section: Optional[dict[str, Any]] = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = {"name": line[1:-1].strip().lower(), "line": lineno, "items": []}
            yield section
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{lineno}: expected KEY = VALUE, got {raw.strip()!r}")
        if section is None:
            raise ConfigError(
                f"{path}:{lineno}: {key.strip()} is outside any [Interface]/[Peer] section"
            )
        section["items"].append((lineno, key.strip(), value.strip()))


def parse(text: str, path: str = "<config>") -> TunnelConfig:
    interface: dict[str, tuple[int, str]] = {}
    peers: list[dict[str, list[tuple[int, str]]]] = []
    for sec in list(_sections(text, path)):
        if sec["name"] == "interface":
            target = interface
        elif sec["name"] == "peer":
            peers.append({})
        else:
            raise ConfigError(
                f"{path}:{sec['line']}: unknown section [{sec['name']}] (expected [Interface] or [Peer])"
            )
        for lineno, key, value in sec["items"]:
            k = key.lower()
            if k in IGNORED_KEYS:
                continue
            if sec["name"] == "interface":
                if k not in INTERFACE_KEYS:
                    raise ConfigError(f"{path}:{lineno}: unknown [Interface] key {key!r}")
                if k == "address" and k in interface:  # several Address lines: join like wg-quick
                    value = interface[k][1] + "," + value
                target[k] = (lineno, value)
            else:
                if k not in PEER_KEYS:
                    raise ConfigError(f"{path}:{lineno}: unknown [Peer] key {key!r}")
                peers[-1].setdefault(k, []).append((lineno, value))
    if not interface:
        raise ConfigError(f"{path}: no [Interface] section")
    if len(peers) != 1:
        raise ConfigError(f"{path}: exactly one [Peer] (the hub) is needed, found {len(peers)}")
    peer = {k: v for k, v in peers[0].items()}

    def need(d, key, section):
        if key not in d:
            raise ConfigError(f"{path}: [{section}] has no {key_names[key]}")
        v = d[key]
        return v[-1] if isinstance(v, list) else v

    key_names = {
        "privatekey": "PrivateKey",
        "address": "Address",
        "publickey": "PublicKey",
        "endpoint": "Endpoint",
    }

    line, private = need(interface, "privatekey", "Interface")
    if not is_key(private):
        raise ConfigError(f"{path}:{line}: PrivateKey is not a base64 WireGuard key")
    line, addr_text = need(interface, "address", "Interface")
    addrs = []
    for part in addr_text.split(","):
        part = part.strip()
        try:
            iface = ipaddress.ip_interface(part if "/" in part else part + "/32")
        except ValueError:
            raise ConfigError(
                f"{path}:{line}: Address {part!r} is not an IP address/prefix"
            ) from None
        if iface.version == 4:
            addrs.append(iface)
    if not addrs:
        raise ConfigError(
            f"{path}:{line}: Address needs an IPv4 address (IPv6 is not supported yet)"
        )
    line, pub = need(peer, "publickey", "Peer")
    if not is_key(pub):
        raise ConfigError(f"{path}:{line}: PublicKey is not a base64 WireGuard key")
    psk = None
    if "presharedkey" in peer:
        line, psk = peer["presharedkey"][-1]
        if not is_key(psk):
            raise ConfigError(f"{path}:{line}: PresharedKey is not a base64 WireGuard key")
    line, endpoint = need(peer, "endpoint", "Peer")
    parse_endpoint(endpoint, f"{path}:{line}")
    allowed = []
    for line, value in peer.get("allowedips", []):
        for part in value.split(","):
            try:
                net = ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"{path}:{line}: AllowedIPs {part.strip()!r} is not a network"
                ) from None
            if net.version == 4:
                allowed.append(net)
    keepalive = _int(
        peer.get("persistentkeepalive", [None])[-1], "PersistentKeepalive", path, 0, 65535
    )
    listen_port = _int(interface.get("listenport"), "ListenPort", path, 0, 65535)
    mtu = _int(interface.get("mtu"), "MTU", path, 576, 9000)
    return TunnelConfig(
        path=path,
        private_key=private,
        address=addrs[0],
        peer_public_key=pub,
        endpoint=endpoint,
        allowed_ips=tuple(allowed) or (ipaddress.IPv4Network("0.0.0.0/0"),),
        preshared_key=psk,
        keepalive=keepalive or None,
        listen_port=listen_port or None,
        mtu=mtu or 1420,
    )


def _int(item, key, path, lo, hi):
    if item is None:
        return None
    line, value = item
    if value.lower() == "off" and key == "PersistentKeepalive":
        return None
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise ConfigError(f"{path}:{line}: {key} must be a number {lo}-{hi}, got {value!r}")
    return int(value)


def load(path: str | os.PathLike) -> TunnelConfig:
    """Read and validate a config file; it must not be readable by group or others."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such tunnel config file") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the tunnel config: {exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{p}: holds a private key but is readable by others (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {p}"
        )
    return parse(text, str(p))
