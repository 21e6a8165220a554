"""The tunnel beside a role inside a job: the one implementation the in-job supervisor uses.

The supervisor starts `hpcfed tunnel up ...` as a child (`TunnelChild.start`), waits for its
ready file (`wait_ready`: a child that exits first is reported with its own one-line reason,
e.g. "no UDP egress to the hub ..."), then starts the role; the role's container gets an
/etc/hosts (`hosts_text`) mapping the federation's server name to where the tunnel delivers it.
The forwards themselves come from the plan (validated when the plan was built).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from hpcfed.errors import TunnelError
from hpcfed.paths import hpcfed_command

# The child's own "no UDP egress" failure must come before the supervisor gives up waiting, so
# the job reports that distinct reason rather than a bare timeout.
READY_MARGIN = 2.0
MAX_HANDSHAKE_TIMEOUT = 30.0


def handshake_timeout(ready_timeout: float) -> float:
    return max(1.0, min(MAX_HANDSHAKE_TIMEOUT, ready_timeout - READY_MARGIN))


def tunnel_argv(
    config: str,
    local_forwards: Sequence[str],
    remote_forwards: Sequence[str],
    ready_file: str,
    ready_timeout: float = 60.0,
    status_file: Optional[str] = None,
) -> list[str]:
    """The child's command line: the plan's forwards, a ready file, a handshake timeout that
    fails before `ready_timeout` does."""
    argv = hpcfed_command() + ["tunnel", "up", "--config", config, "--ready-file", ready_file]
    argv += ["--handshake-timeout", f"{handshake_timeout(ready_timeout):g}"]
    if status_file:
        argv += ["--status-file", status_file]
    for f in local_forwards:
        argv += ["-L", f]
    for f in remote_forwards:
        argv += ["-R", f]
    return argv


def hosts_text(hosts: Sequence[tuple[str, str]]) -> str:
    """/etc/hosts for the role's container: localhost plus each name -> tunnel address."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"{address} {name}" for name, address in hosts]
    return "\n".join(lines) + "\n"


def _last_stderr_line(proc: subprocess.Popen) -> str:
    err = proc.stderr.read() if proc.stderr else ""
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    line = lines[-1] if lines else f"the tunnel exited with code {proc.returncode}"
    return line.removeprefix("hpcfed: error: ")


def wait_ready(
    proc: subprocess.Popen,
    ready_file: str,
    timeout: float,
    poll: float = 0.05,
    reason: Optional[Callable[[], str]] = None,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """Block until the tunnel child `proc` wrote `ready_file`; TunnelError with the child's own
    reason (its last stderr line) if it exits first, or when `timeout` passes. Returns early
    when `stopping()` turns true."""
    deadline = time.monotonic() + timeout
    path = Path(ready_file)
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise TunnelError(reason() if reason else _last_stderr_line(proc))
        if stopping():
            return
        time.sleep(poll)
    raise TunnelError(f"the tunnel was not ready within {timeout:g}s (no {ready_file})")


class TunnelChild:
    """A running `hpcfed tunnel up`: its stderr is relayed to ours (the job log) line by line,
    and the last line is kept to say why it stopped."""

    def __init__(self, proc: subprocess.Popen, ready_file: str):
        self.proc = proc
        self.ready_file = ready_file
        self.last_line = ""
        self._relay = threading.Thread(target=self._pump, daemon=True)
        self._relay.start()

    @classmethod
    def start(cls, argv: list[str], ready_file: str) -> TunnelChild:
        Path(ready_file).unlink(missing_ok=True)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # our signals reach it only through stop()
        )
        return cls(proc, ready_file)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self.last_line = line.strip()

    def reason(self) -> str:
        self._relay.join(timeout=5)  # the child exited: its last words are in the pipe
        line = self.last_line or f"the tunnel exited with code {self.proc.returncode}"
        return line.removeprefix("hpcfed: error: ")

    def wait_ready(
        self, timeout: float, poll: float = 0.05, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        wait_ready(self.proc, self.ready_file, timeout, poll, reason=self.reason, stopping=stopping)

    def exited(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._relay.join(timeout=5)
