"""One scheduler interface, two backends: the Slurm CLI (default) and pyslurm (optional).

A backend answers for many jobs with one call (status polling is batched), and an answer it
could not get is SchedulerUnavailable - the caller then says *unknown*, never *gone*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Protocol

if TYPE_CHECKING:
    from hpcfed.plan import SchedulerTarget
    from hpcfed.runner import Runner

# Slurm states grouped by what they mean for a deployment.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
}
# Our own states: the scheduler answered but has no record of the job (accounting off or purged).
GONE = "GONE"
UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # Slurm's state, or GONE / UNKNOWN
    reason: str = ""
    name: str = ""
    node: str = ""
    elapsed: str = ""
    exit_code: str = ""
    source: str = ""  # squeue / sacct / - : where the answer came from

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Scheduler(Protocol):
    def submit(self, script: str, *, job_name: str, comment: str) -> str: ...

    def query(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]: ...

    def cancel(self, job_id: str, signal: Optional[str] = None) -> None: ...

    def find(self, job_name: str, comment: str) -> Optional[str]: ...

    def calls(self) -> int: ...


def make_scheduler(target: SchedulerTarget, runner: Runner) -> Scheduler:
    """The backend a plan's SchedulerTarget asks for, running through `runner`."""
    if target.backend == "pyslurm":
        from hpcfed.scheduler.pyslurm_backend import PyslurmScheduler

        return PyslurmScheduler(target, runner)
    from hpcfed.scheduler.slurm_cli import SlurmCli

    return SlurmCli(runner, env=dict(target.env), timeout=target.timeout)
