"""Where a plan's jobs are submitted and asked about: the scheduler backend and how to reach it.

Kept apart from hpcfed.plan so that `hpcfed status`, `logs` and `cancel`, which need only this
part of a recorded plan, do not import the plan's models, the site profile schema and the role
table on every call.
"""

from __future__ import annotations

from typing import Dict, Optional

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SshTarget(_Frozen):
    host: Optional[str] = None
    user: Optional[str] = None
    port: int = 22
    key: Optional[str] = None
    known_hosts: Optional[str] = None
    accept_unknown_host: bool = False


class SchedulerTarget(_Frozen):
    backend: str = "slurm-cli"
    connect: str = "local"
    ssh: SshTarget = SshTarget()
    env: Dict[str, str] = {}
    timeout: int = 30
