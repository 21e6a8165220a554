"""Start, record and stop the cluster's daemons by PID — only the ones we started.

Each daemon runs in the foreground of its own session (so it survives `hpcfed` exiting and we
know its PID without pid-file races). The record keeps the kernel's start time of the process,
so a PID the kernel has reused for something else is never signalled. Every daemon also gets a
marker variable in its environment; processes it spawns (slurmstepd) inherit it, which lets
`down` find and stop leftovers that no PID file names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

MARKER_VAR = "HPCFED_TESTCLUSTER"


@dataclass(frozen=True)
class DaemonRecord:
    name: str
    pid: int
    argv: list
    start_ticks: int  # /proc/PID/stat field 22: distinguishes a reused PID

    def alive(self) -> bool:
        ticks = _start_ticks(self.pid)
        return ticks is not None and ticks == self.start_ticks


def _stat_fields(pid: int) -> Optional[list]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; split after its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):  # zombie / dead: not running
        return None
    return int(fields[19])


class DaemonTable:
    """The daemons of one cluster, persisted as JSON under PREFIX/run (atomic rewrite)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def load(self) -> list[DaemonRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [DaemonRecord(**d) for d in data]

    def save(self, records: Iterable[DaemonRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=1))
        os.replace(tmp, self.path)

    def add(self, record: DaemonRecord) -> None:
        records = [r for r in self.load() if r.name != record.name]
        self.save(records + [record])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def start(
    name: str,
    argv: list,
    log_path: str,
    marker: str,
    user: Optional[str] = None,
    env: Optional[dict] = None,
) -> tuple[DaemonRecord, subprocess.Popen]:
    """Start argv detached (own session, no inherited pipes), logging to log_path."""
    env = dict(os.environ, **(env or {}))
    env[MARKER_VAR] = marker
    if user is not None:
        argv = ["runuser", "-u", user, "--"] + list(argv)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",  # like any daemon: never hold (or lose) the caller's working directory
        )
    pid = proc.pid
    if user is not None:
        # runuser forks the real daemon as its child: record that one, not runuser.
        pid = _wait_for_child(proc.pid) or proc.pid
    ticks = _start_ticks(pid) or 0
    return DaemonRecord(name=name, pid=pid, argv=list(argv), start_ticks=ticks), proc


def _wait_for_child(pid: int, timeout: float = 5.0) -> Optional[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        if children:
            return int(children[0])
        time.sleep(0.05)
    return None


def stop(record: DaemonRecord, timeout: float = 15.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if it was running."""
    if not record.alive():
        return False
    return _terminate(record.pid, record.alive, timeout)


def _terminate(pid: int, still_alive, timeout: float) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not still_alive():
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and still_alive():
        time.sleep(0.1)
    return True


def marked_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries our marker (daemons and their children)."""
    needle = f"{MARKER_VAR}={marker}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ + b"\0" and _start_ticks(pid) is not None:
            found.append(pid)
    return found


def stop_marked(marker: str, timeout: float = 10.0) -> list[int]:
    """Stop every live process that carries the marker; returns their PIDs."""
    pids = marked_processes(marker)
    for pid in pids:
        ticks = _start_ticks(pid)
        _terminate(pid, lambda p=pid, t=ticks: _start_ticks(p) == t, timeout)
    return pids
