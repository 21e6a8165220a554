"""Run scheduler commands and move files: on this machine, or on a login node over SSH.

Both runners have the same small interface, so the scheduler backends never know which one they
use. Relative paths are relative to the (cluster) home directory, where commands also run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    where: str  # "local" or "user@host:port", for messages

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[str] = None,
        timeout: float = 30,
    ) -> Result: ...

    def read_file(self, path: str, offset: int = 0) -> bytes: ...

    def mkdirs(self, path: str) -> None: ...

    def close(self) -> None: ...


def make_runner(target) -> Runner:
    """The runner for a plan's SchedulerTarget (hpcfed.plan.SchedulerTarget)."""
    if target.connect == "ssh":
        from hpcfed.runner.ssh import SshRunner

        return SshRunner(target.ssh, io_timeout=target.timeout)
    from hpcfed.runner.local import LocalRunner

    return LocalRunner()
