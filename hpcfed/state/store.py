"""The deployment store: name -> record (plan, jobs, events, stopped flag)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from hpcfed import paths
from hpcfed.errors import NotFound
from hpcfed.names import check_name
from hpcfed.state.lock import lease_lock


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def epoch(stamp: str) -> float:
    """Seconds since the epoch of a now() stamp (0 for anything unreadable)."""
    import datetime

    try:
        return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return 0.0


@dataclass
class Deployment:
    name: str
    deployment_id: str
    site: str
    role: str
    framework: str
    plan: Dict[str, Any]
    jobs: List[Dict[str, Any]] = field(default_factory=list)  # {job_id, submitted_at}
    events: List[Dict[str, Any]] = field(default_factory=list)  # {time, event, detail}
    stopped: bool = False  # the user cancelled it on purpose: rejoin leaves it alone
    created_at: str = field(default_factory=now)

    @property
    def job_id(self) -> Optional[str]:
        return self.jobs[-1]["job_id"] if self.jobs else None

    def add_event(self, event: str, detail: str = "") -> None:
        self.events.append({"time": now(), "event": event, "detail": detail})

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "deployment_id": self.deployment_id,
            "site": self.site,
            "role": self.role,
            "framework": self.framework,
            "plan": self.plan,
            "jobs": self.jobs,
            "events": self.events,
            "stopped": self.stopped,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Deployment:
        return cls(
            **{
                k: d[k]
                for k in (
                    "name",
                    "deployment_id",
                    "site",
                    "role",
                    "framework",
                    "plan",
                    "jobs",
                    "events",
                    "stopped",
                    "created_at",
                )
                if k in d
            }
        )


class DeploymentStore:
    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root else paths.state_dir() / "deployments"

    def _file(self, name: str) -> Path:
        return self.root / f"{check_name('deployment', name)}.json"

    def _ensure(self) -> None:
        paths.private_mkdir(self.root)

    def get(self, name: str) -> Optional[Deployment]:
        try:
            return Deployment.from_dict(json.loads(self._file(name).read_text()))
        except FileNotFoundError:
            return None

    def require(self, name: str) -> Deployment:
        dep = self.get(name)
        if dep is None:
            raise NotFound(f"no deployment named {name!r} (see `hpcfed status`)")
        return dep

    def all(self) -> List[Deployment]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                out.append(Deployment.from_dict(json.loads(p.read_text())))
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # removed, or a foreign file
        return out

    def put(self, dep: Deployment) -> None:
        """Write atomically: unique temp file in the same directory, fsync, rename."""
        self._ensure()
        tmp = self.root / f".{dep.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dep.to_dict(), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file(dep.name))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def lock(self, name: str, lease: float = 120.0, wait: float = 60.0):
        """Lock one deployment for a read-modify-write across processes and login nodes."""
        self._ensure()
        return lease_lock(
            self.root / f".{check_name('deployment', name)}.lock", lease=lease, wait=wait
        )

    def update(self, name: str, change: Callable[[Deployment], None]) -> Deployment:
        with self.lock(name):
            dep = self.require(name)
            change(dep)
            self.put(dep)
            return dep
