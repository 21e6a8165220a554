"""Optional backend through pyslurm, used only when it imports and matches the installed Slurm.

No pyslurm release matches Slurm 22.05 (our clusters and CI), so this backend is NOT exercised
by the test suite; the Slurm CLI backend is the default and the tested one. It talks to the
local slurmctld only (pyslurm is a C binding), so it cannot run over SSH.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, Optional

from hpcfed.errors import EnvironmentProblem, SchedulerUnavailable
from hpcfed.scheduler import GONE, JobInfo
from hpcfed.scheduler.slurm_cli import SlurmCli

if TYPE_CHECKING:
    from hpcfed.plan import SchedulerTarget
    from hpcfed.runner import Runner


class PyslurmScheduler(SlurmCli):
    """Queries through pyslurm; submit/cancel stay on the CLI (same flags as the default)."""

    def __init__(self, target: SchedulerTarget, runner: Runner) -> None:
        if target.connect != "local":
            raise EnvironmentProblem("scheduler.backend pyslurm works only with connect: local")
        try:
            import pyslurm  # noqa: F401
        except Exception as exc:  # ImportError, or its own "Slurm version mismatch"
            raise EnvironmentProblem(
                f"scheduler.backend pyslurm: cannot use pyslurm ({exc}); use backend: slurm-cli"
            ) from None
        super().__init__(runner, env=dict(target.env), timeout=target.timeout)

    def query(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        import pyslurm

        ids = {str(j) for j in job_ids}
        self._calls += 1
        try:
            loaded = pyslurm.Jobs.load()
        except Exception as exc:
            raise SchedulerUnavailable(f"pyslurm: {exc}") from None
        out: Dict[str, JobInfo] = {}
        for job_id, job in loaded.items():
            if str(job_id) in ids:
                out[str(job_id)] = JobInfo(
                    job_id=str(job_id),
                    state=str(job.state),
                    reason=str(job.state_reason or ""),
                    name=str(job.name or ""),
                    source="pyslurm",
                )
        for j in ids - set(out):
            out[j] = JobInfo(job_id=j, state=GONE, reason="no record", source="-")
        return out

    def find(self, job_name: str, comment: str) -> Optional[str]:
        return super().find(job_name, comment)
