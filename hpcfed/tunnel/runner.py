"""Run the tunnel in the foreground (what a job does): build the data plane's spec, stop cleanly on
SIGTERM/SIGINT, turn data-plane failures into TunnelError (exit 9)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hpcfed.errors import ConfigError, EnvironmentProblem, TunnelError
from hpcfed.paths import private_mkdir, state_dir
from hpcfed.tunnel.config import TunnelConfig
from hpcfed.tunnel.files import write_private
from hpcfed.tunnel.forwards import LocalForward, RemoteForward, as_dict, check_unique


@dataclass(frozen=True)
class RunOptions:
    ready_file: Optional[str] = None
    status_file: Optional[str] = None
    handshake_timeout: float = 30.0
    liveness: float = 60.0
    allow_other_users: bool = False
    buffer_kib: int = 256
    max_connections: int = 1024


# Longest timer the data plane accepts (seconds; its Duration arithmetic overflows beyond).
MAX_SECONDS = 1e9


def status_dir() -> Path:
    return state_dir() / "tunnel"


def default_status_file(cfg: TunnelConfig) -> str:
    """One status file per config *path*: every hub peer file is called wg.conf, so the name
    alone would make tunnels of different configs overwrite each other's status."""
    path = Path(cfg.path).resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return str(status_dir() / f"{path.stem}-{digest}.json")


def build_spec(
    cfg: TunnelConfig,
    local: Sequence[LocalForward],
    remote: Sequence[RemoteForward],
    opts: RunOptions,
) -> dict:
    """The data plane's input (pure; holds the private key, so never logged or put in argv)."""
    check_unique(list(local), list(remote))
    for f in local:
        if not any(ipaddress.ip_address(f.target) in net for net in cfg.allowed_ips):
            nets = ", ".join(map(str, cfg.allowed_ips))
            raise ConfigError(
                f"-L {f}: {f.target} is outside the hub peer's AllowedIPs ({nets}) in {cfg.path}"
            )
    for name, value in (
        ("--handshake-timeout", opts.handshake_timeout),
        ("--liveness", opts.liveness),
    ):
        if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
            raise ConfigError(
                f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g}, got {value}"
            )
    if opts.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {opts.max_connections}")
    for path in (opts.ready_file, opts.status_file):
        if path and not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{path}: its directory does not exist")
    return {
        "private_key": cfg.private_key,
        "peer_public_key": cfg.peer_public_key,
        "preshared_key": cfg.preshared_key,
        "endpoint": cfg.endpoint,
        "address": str(cfg.address.ip),
        "prefix": cfg.address.network.prefixlen,
        "mtu": cfg.mtu,
        "keepalive": cfg.keepalive,
        "listen_port": cfg.listen_port,
        "local_forwards": [as_dict(f) for f in local],
        "remote_forwards": [as_dict(f) for f in remote],
        "ready_file": opts.ready_file,
        "status_file": opts.status_file,
        "config": str(Path(cfg.path).resolve()),
        "handshake_timeout": float(opts.handshake_timeout),
        "liveness": float(opts.liveness),
        "allow_other_users": bool(opts.allow_other_users),
        "buffer_kib": int(opts.buffer_kib),
        "max_connections": int(opts.max_connections),
    }


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def data_plane():
    """The compiled extension, imported only here."""
    try:
        from hpcfed import _tunnel
    except ImportError as exc:
        raise EnvironmentProblem(
            f"the compiled tunnel (hpcfed._tunnel) is missing ({exc}); reinstall hpcfed"
        ) from None
    return _tunnel


def run(
    cfg: TunnelConfig,
    local: Sequence[LocalForward],
    remote: Sequence[RemoteForward],
    opts: RunOptions,
) -> None:
    """Block until SIGTERM/SIGINT (clean return) or a tunnel failure (TunnelError)."""
    spec = build_spec(cfg, local, remote, opts)
    if opts.status_file is None:
        private_mkdir(status_dir())
        spec["status_file"] = default_status_file(cfg)
    tunnel = data_plane()
    previous = {
        s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        tunnel.run(json.dumps(spec))
    except _Stop:
        pass
    except RuntimeError as exc:
        raise TunnelError(str(exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _mark_stopped(spec["status_file"])


def _mark_stopped(path: Optional[str]) -> None:
    if not path:
        return
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    data.update(state="stopped", connections_active=0)
    write_private(path, json.dumps(data, indent=2))
