"""Can this machine reach the federation's server through its tunnel? (`hpcfed doctor`)

Starts the peer's own tunnel (`hpcfed tunnel up`, userspace, no root) with a forward of the
server's port to a free local port, waits for the handshake with the hub, then opens a
connection through it. A userspace -L listener accepts at once, so "connected" proves nothing;
every supported framework's server speaks TLS (NVFlare, Flower, Fed-BioMed's gRPC), so the probe
starts a TLS handshake: any TLS answer - a completed handshake, or an alert because we show no
client certificate - came from the server itself. A port nothing listens on is reset within a
round trip; an unreachable server (its job down, the hub refusing the route) stays silent.
Nothing is verified and nothing is sent but a ClientHello: this is reachability, not trust.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from hpcfed.errors import TunnelError
from hpcfed.tunnel import job as tunnel_job

# A TLS answer or a reset comes back within a few round trips through the hub.
ANSWER_WAIT_S = 15.0


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_server(
    config: str, server_ip: str, port: int, ready_timeout: float = 30.0
) -> ProbeResult:
    """Whether `server_ip:port` accepts a connection through the tunnel of `config`."""
    local = free_local_port()
    with tempfile.TemporaryDirectory(prefix="hpcfed-probe-") as tmp:
        ready = os.path.join(tmp, "ready")
        argv = tunnel_job.tunnel_argv(
            config, [f"127.0.0.1:{local}={server_ip}:{port}"], [], ready, ready_timeout
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            started = time.monotonic()
            try:
                tunnel_job.wait_ready(proc, ready, ready_timeout)
            except TunnelError as exc:
                return ProbeResult(False, f"no tunnel: {exc}")
            handshake = time.monotonic() - started
            return _try_connect(local, server_ip, port, handshake)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _try_connect(local: int, server_ip: str, port: int, handshake: float) -> ProbeResult:
    import ssl

    where = f"{server_ip}:{port} through the hub"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", local), timeout=ANSWER_WAIT_S) as raw:
            with context.wrap_socket(raw) as tls:
                version = tls.version()
        return ProbeResult(
            True, f"{where}: a TLS server answered ({version}; hub {handshake:.1f} s)"
        )
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
        return _closed(where, t0, exc)
    except ssl.SSLError as exc:
        if exc.reason and "ALERT" in exc.reason.upper():
            # It refused us (no client certificate, say), but it is the server talking.
            return ProbeResult(True, f"{where}: a TLS server answered ({exc.reason})")
        return ProbeResult(False, f"{where}: something answered, but not TLS ({exc.reason})")
    except socket.timeout:
        return ProbeResult(
            False,
            f"{where}: no answer within {ANSWER_WAIT_S:g} s - the server's job is not "
            "running or not connected to the hub, or the hub does not route to it",
        )
    except OSError as exc:  # reset, aborted
        return _closed(where, t0, exc)


def _closed(where: str, t0: float, exc: Exception) -> ProbeResult:
    waited = time.monotonic() - t0
    return ProbeResult(
        False, f"{where}: closed after {waited:.1f} s - nothing listens on that port ({exc})"
    )
