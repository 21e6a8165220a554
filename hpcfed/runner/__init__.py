"""Run scheduler commands and move files: on this machine, or on a login node over SSH.

Both runners have the same small interface, so the scheduler backends never know which one they
use. Relative paths are relative to the (cluster) home directory, where commands also run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Protocol, Sequence

if TYPE_CHECKING:
    from hpcfed.plan import SchedulerTarget

# Variables through which a shell steers Slurm's commands (sbatch reads SBATCH_* as options and
# passes SLURM_* into the job; squeue/sacct/scancel read their own). The submitting shell's must
# not change what hpcfed submits, reads or cancels: a shell inside a job (scrontab) has dozens.
SLURM_STEERING = (
    "SBATCH_",
    "SLURM_",
    "SQUEUE_",
    "SACCT_",
    "SCANCEL_",
    "SCONTROL_",
    "SALLOC_",
    "SRUN_",
    "SINFO_",
)
KEEP = frozenset({"SLURM_CONF"})  # where the cluster's configuration is: needed to reach it at all


def command_env(environ: Mapping[str, str], extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """The environment of a scheduler command: the caller's without Slurm-steering variables,
    messages in the C locale (parsed, never translated), plus `extra` (the profile's env)."""
    env = {k: v for k, v in environ.items() if k in KEEP or not k.startswith(SLURM_STEERING)}
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


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

    def write_file(self, path: str, data: bytes) -> None:
        """Replace `path` with `data` whole (a reader sees the old or the new file), mode 0600
        from the first byte (the job runs as the same user; an input may be private)."""
        ...

    def close(self) -> None: ...


def make_runner(target: SchedulerTarget) -> Runner:
    """The runner for a plan's SchedulerTarget (hpcfed.plan.SchedulerTarget)."""
    if target.connect == "ssh":
        from hpcfed.runner.ssh import SshRunner

        return SshRunner(target.ssh, io_timeout=target.timeout)
    from hpcfed.runner.local import LocalRunner

    return LocalRunner()
