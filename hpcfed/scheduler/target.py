"""Where a plan's jobs are submitted and asked about: the scheduler backend and how to reach it.

Kept apart from hpcfed.plan so that `hpcfed status`, `logs` and `cancel`, which need only this
part of a recorded plan, do not import the plan's models, the site profile schema and the role
table on every call.
"""

from __future__ import annotations

from typing import Dict, Literal, Optional

from hpcfed.model import Field, Model


# The settings are defined here once: the site profile's `scheduler:` section
# (hpcfed.profiles.schema.SchedulerSettings) is these models read strictly, with its checks.
class SshTarget(Model):
    host: Optional[str] = None
    user: Optional[str] = None
    port: int = Field(default=22, ge=1, le=65535)
    key: Optional[str] = None  # a private key file; else the SSH agent / default keys
    known_hosts: Optional[str] = None  # default ~/.ssh/known_hosts
    accept_unknown_host: bool = False  # never on by default: unknown host keys are refused


class SchedulerTarget(Model):
    backend: Literal["slurm-cli", "pyslurm"] = "slurm-cli"
    connect: Literal["local", "ssh"] = "local"
    ssh: SshTarget = SshTarget()
    env: Dict[str, str] = {}  # environment for sbatch/squeue/... (e.g. SLURM_CONF)
    timeout: int = Field(default=30, ge=1)  # seconds one scheduler command may take
