"""The deployment store: name -> record (plan, jobs, events, stopped flag)."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional

from hpcfed import paths
from hpcfed.errors import ConfigError, NotFound
from hpcfed.names import check_name
from hpcfed.state.lock import lease_lock, this_host

# The record layout's version, written into every record. A record of an older version is
# migrated when read (MIGRATIONS); one of a newer version is refused, that record alone.
SCHEMA_VERSION = 1
# version -> the change that turns a record of that version into one of the next
MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    0: lambda d: d,  # before versions: same layout
}
# How long after its holder crashed a deployment's lock may be broken (a live holder renews it).
LEASE = 60.0
# field -> type a readable record must have there
REQUIRED = {
    "name": str,
    "deployment_id": str,
    "site": str,
    "role": str,
    "framework": str,
    "plan": dict,
    "jobs": list,
}


class BadRecord(ConfigError):
    """A deployment record this hpcfed cannot use (unreadable, foreign, or from a newer hpcfed)."""


def warn_skipped(problem: BadRecord) -> None:
    """What a listing does with a bad record by default: one line on stderr, then goes on."""
    sys.stderr.write(f"hpcfed: warning: {problem}; skipped\n")
    sys.stderr.flush()


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
    # An sbatch under way ({since, by, job_name, comment}), written before it runs: a record that
    # still has it after the command is gone means hpcfed died around sbatch; the next command
    # looks for a job carrying the marker (hpcfed.deploy.settle_pending).
    pending: Optional[Dict[str, Any]] = None

    @property
    def job_id(self) -> Optional[str]:
        return self.jobs[-1]["job_id"] if self.jobs else None

    def add_event(self, event: str, detail: str = "") -> None:
        self.events.append({"time": now(), "event": event, "detail": detail})

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
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
            "pending": self.pending,
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
                    "pending",
                )
                if k in d
            }
        )


def parse_record(path: Path, raw: bytes) -> Deployment:
    """The deployment in a record file's bytes, migrated to SCHEMA_VERSION, or BadRecord."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:  # also UnicodeDecodeError
        raise BadRecord(f"{path}: not a deployment record (not JSON)") from None
    if not isinstance(data, dict):
        raise BadRecord(f"{path}: not a deployment record (a JSON {type(data).__name__})")
    version = data.get("schema", 0)
    if not isinstance(version, int) or version < 0:
        raise BadRecord(f"{path}: not a deployment record (schema {version!r})")
    if version > SCHEMA_VERSION:
        raise BadRecord(
            f"{path}: written by a newer hpcfed (record schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}): use that hpcfed for this deployment"
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise BadRecord(
                f"{path}: not a deployment record ({key!r} missing or not a {kind.__name__})"
            )
    if data["name"] != path.name[: -len(".json")]:
        raise BadRecord(f"{path}: holds deployment {data['name']!r}, not the one its name says")
    if not isinstance(data.get("pending"), (dict, type(None))):
        raise BadRecord(f"{path}: not a deployment record ('pending' is not a mapping)")
    if not all(isinstance(j, dict) and isinstance(j.get("job_id"), str) for j in data["jobs"]):
        raise BadRecord(f"{path}: not a deployment record (a job without a job_id)")
    return Deployment.from_dict(data)


class DeploymentStore:
    def __init__(
        self,
        root: Optional[Path] = None,
        on_bad: Callable[[BadRecord], None] = warn_skipped,
    ):
        self.root = Path(root) if root else paths.state_dir() / "deployments"
        self.on_bad = on_bad  # what all() does with a record it cannot use

    def _file(self, name: str) -> Path:
        return self.root / f"{check_name('deployment', name)}.json"

    def _ensure(self) -> None:
        paths.private_mkdir(self.root)

    def get(self, name: str) -> Optional[Deployment]:
        """The deployment, None when there is none, BadRecord when its record is unusable."""
        return self._read(self._file(name))

    @staticmethod
    def _read(path: Path) -> Optional[Deployment]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BadRecord(f"{path}: cannot read ({exc.strerror})") from None
        return parse_record(path, raw)

    def require(self, name: str) -> Deployment:
        dep = self.get(name)
        if dep is None:
            raise NotFound(f"no deployment named {name!r} (see `hpcfed status`)")
        return dep

    def all(self) -> List[Deployment]:
        """Every usable deployment; each bad record goes to on_bad (one line) and is skipped."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                dep = self._read(p)
            except BadRecord as problem:
                self.on_bad(problem)
                continue
            if dep is not None:  # None: removed meanwhile
                out.append(dep)
        return out

    def put(self, dep: Deployment) -> None:
        """Write atomically: unique temp file in the same directory, fsync, rename."""
        self._ensure()
        tmp = self.root / f".{dep.name}.{this_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
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

    def remove(self, name: str) -> None:
        """Forget a deployment (one whose only submission never happened)."""
        self._file(name).unlink(missing_ok=True)

    def lock(self, name: str, lease: float = LEASE, wait: float = 60.0) -> ContextManager[str]:
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
