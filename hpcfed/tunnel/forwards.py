"""Port-forward specs of `hpcfed tunnel up`.

-L [bind:]port=tunnel_ip:port   a listener on this node (default bind 127.0.0.1) carried to a
                                 peer's tunnel address
-R port=host:port               connections arriving at this job's tunnel address on `port`
                                 carried to a local service host:port
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

from hpcfed.errors import ConfigError


@dataclass(frozen=True)
class LocalForward:
    bind: str
    port: int
    target: str
    target_port: int

    def __str__(self) -> str:
        return f"{self.bind}:{self.port}={self.target}:{self.target_port}"


@dataclass(frozen=True)
class RemoteForward:
    port: int
    host: str
    host_port: int

    def __str__(self) -> str:
        return f"{self.port}={self.host}:{self.host_port}"


def _port(text: str, spec: str, flag: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{flag} {spec!r}: {text!r} is not a port (1-65535)")
    return int(text)


def _split(spec: str, flag: str, form: str):
    left, sep, right = spec.partition("=")
    host, sep2, port = right.rpartition(":")
    if not sep or not sep2 or not host:
        raise ConfigError(f"{flag} {spec!r}: expected {form}")
    return left, host.strip("[]"), port


def parse_local(spec: str) -> LocalForward:
    left, target, tport = _split(spec, "-L", "[bind:]port=tunnel_ip:port")
    bind, _, port = left.rpartition(":")
    try:
        ip = ipaddress.ip_address(target)
    except ValueError:
        raise ConfigError(f"-L {spec!r}: {target!r} is not a tunnel IPv4 address") from None
    if ip.version != 4:
        raise ConfigError(f"-L {spec!r}: {target!r} is not a tunnel IPv4 address")
    return LocalForward(
        bind.strip("[]") or "127.0.0.1", _port(port, spec, "-L"), target, _port(tport, spec, "-L")
    )


def parse_tunnel_ip(value: str, flag: str = "--server-ip") -> str:
    """A peer's tunnel address (IPv4, as the hub assigns them), or a one-line ConfigError."""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: not an IPv4 tunnel address") from None


def parse_remote(spec: str) -> RemoteForward:
    port, host, hport = _split(spec, "-R", "port=host:port")
    return RemoteForward(_port(port, spec, "-R"), host, _port(hport, spec, "-R"))


def check_unique(local: list[LocalForward], remote: list[RemoteForward]) -> None:
    seen = set()
    for f in local:
        if (f.bind, f.port) in seen:
            raise ConfigError(f"-L {f}: {f.bind}:{f.port} is forwarded twice")
        seen.add((f.bind, f.port))
    ports = [f.port for f in remote]
    for p in ports:
        if ports.count(p) > 1:
            raise ConfigError(f"-R: tunnel port {p} is forwarded twice")


as_dict = asdict
