"""What Slurm tells the job about itself, and the job's files in the deployment directory.

Read once from an environment mapping (os.environ in a job, a dict in tests), so nothing else in
the supervisor looks at SLURM_* variables. Asking Slurm to requeue the job lives here too: it
is the one thing the job asks of the scheduler.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Tuple

NO_JOB = "nojob"  # the job id outside Slurm (a plan run by hand, the tests)


@dataclass(frozen=True)
class JobEnvironment:
    """Slurm's view of this run of the job."""

    job_id: str
    restart: int  # SLURM_RESTART_COUNT: 0 on the first run, +1 per requeue
    node: str  # the node this batch shell runs on
    node_list: str  # every node of the allocation (one, for hpcfed's jobs)
    gpus: str  # CUDA_VISIBLE_DEVICES as Slurm set it
    site_allows_requeue: bool  # the site profile's preemption.requeue

    @classmethod
    def read(cls, environ: Mapping[str, str], site_allows_requeue: bool) -> JobEnvironment:
        node = environ.get("SLURMD_NODENAME") or os.uname().nodename
        return cls(
            job_id=environ.get("SLURM_JOB_ID", NO_JOB),
            # Slurm sets it empty on some releases before the first requeue.
            restart=int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
            node=node,
            node_list=environ.get("SLURM_JOB_NODELIST", node),
            gpus=environ.get("CUDA_VISIBLE_DEVICES", ""),
            site_allows_requeue=site_allows_requeue,
        )

    @property
    def in_slurm(self) -> bool:
        return self.job_id != NO_JOB

    @property
    def requeue_allowed(self) -> bool:
        """Only a real Slurm job can be requeued, and only where the site profile allows it."""
        return self.site_allows_requeue and self.in_slurm


@dataclass(frozen=True)
class JobPaths:
    """The job's files in the deployment directory; per job id where runs must not share."""

    workdir: Path
    job_id: str

    @property
    def events(self) -> Path:
        """events.jsonl, shared by every job of the deployment (`hpcfed status NAME`)."""
        return self.workdir / "events.jsonl"

    @property
    def status(self) -> Path:
        """The exit report that `hpcfed rejoin` reads when Slurm kept no record."""
        return self.workdir / f"status-{self.job_id}.json"

    @property
    def hosts(self) -> Path:
        return self.workdir / f"hosts-{self.job_id}"

    @property
    def tunnel_ready(self) -> Path:
        return self.workdir / f"tunnel-{self.job_id}.ready"


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def requeue(job_id: str, run: Runner = subprocess.run) -> Tuple[str, str]:
    """`scontrol requeue JOB`: ("requeued" | "failed" (could not ask) | "refused", detail).
    `run` is injectable for tests."""
    try:
        res = run(
            ["scontrol", "requeue", job_id],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "failed", str(exc)
    if res.returncode == 0:
        return "requeued", "scontrol requeue"
    return "refused", (res.stderr or res.stdout).strip()
