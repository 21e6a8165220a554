"""Starting the tunnel beside a role inside a job (used by the in-job supervisor).

The supervisor runs `python -m hpcfed tunnel up ...` as a child, waits for its ready file, then
starts the role. The server role gets a remote forward for the framework's port; clients a local
forward to the server's (stable) tunnel address, and the container's /etc/hosts maps the
federation's server name to where that forward listens.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from hpcfed.errors import ConfigError, TunnelError
from hpcfed.paths import hpcfed_command

LOCAL_BIND = "127.0.0.1"


def tunnel_argv(
    config: str,
    role: str,
    ports: Sequence[int],
    server_address: Optional[str],
    ready_file: str,
    status_file: Optional[str] = None,
) -> list[str]:
    """The child's command line for `role` ("server" or a client role) and the framework ports."""
    argv = hpcfed_command() + ["tunnel", "up", "--config", config, "--ready-file", ready_file]
    if status_file:
        argv += ["--status-file", status_file]
    for port in ports:
        if role == "server":
            argv += ["-R", f"{port}={LOCAL_BIND}:{port}"]
        else:
            if not server_address:
                raise ConfigError(
                    f"role {role}: the server's tunnel address is needed for its -L forward"
                )
            argv += ["-L", f"{LOCAL_BIND}:{port}={server_address}:{port}"]
    return argv


def hosts_line(server_name: str) -> str:
    """/etc/hosts line for the container: the server's name resolves to the local forward."""
    return f"{LOCAL_BIND}\t{server_name}\n"


def wait_ready(proc: subprocess.Popen, ready_file: str, timeout: float, poll: float = 0.05) -> None:
    """Block until the tunnel child wrote its ready file; TunnelError if it exits or times out.

    The child's own handshake timeout ("no UDP egress to the hub ...", exit 9) should be shorter
    than `timeout`, so its distinct message is what the job reports.
    """
    deadline = time.monotonic() + timeout
    path = Path(ready_file)
    while time.monotonic() < deadline:
        if path.exists():
            return
        code = proc.poll()
        if code is not None:
            err = proc.stderr.read() if proc.stderr else ""
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            line = next(
                (l for l in reversed(err.strip().splitlines()) if l.strip()), f"exit code {code}"
            )
            raise TunnelError(line.removeprefix("hpcfed: error: "))
        time.sleep(poll)
    raise TunnelError(f"the tunnel was not ready within {timeout:.0f}s (no {ready_file})")
