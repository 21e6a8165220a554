"""hpcfed from Python: the same plan/submit/status/logs/cancel/rejoin as the command line.

    import hpcfed

    site = hpcfed.Site("local")
    dep = site.submit("client", gpus=2, kit="~/kits/site-1")
    dep.job_id, dep.state            # '42', 'PENDING'
    print(dep.logs())                # the job's output so far
    dep.cancel()
    dep.wait()                       # the final Status once the job has ended

The CLI is a thin layer over the same functions (hpcfed.submission, hpcfed.deploy), so a
request fails here with the exception type (hpcfed.errors) and one-line message the command
prints. The shape follows submitit where it fits: a handle with `job_id`, `state` and a
blocking `wait()`. Deployments are the CLI's: `hpcfed status` lists what the API submitted and
`hpcfed.deployment(name)` picks up what the CLI submitted.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    Union,
    overload,
)

from hpcfed.errors import SchedulerUnavailable

if TYPE_CHECKING:
    from hpcfed.plan import Plan
    from hpcfed.profiles.loader import LoadedSite
    from hpcfed.profiles.schema import SiteProfile
    from hpcfed.rejoin import Outcome
    from hpcfed.state import Deployment as Record
    from hpcfed.state import DeploymentStore

__all__ = ["Site", "Deployment", "Status", "deployments", "deployment", "rejoin"]


@dataclass(frozen=True)
class Status:
    """One look at a deployment, as a row of `hpcfed status --json`.

    `state` is what the deployment is in: the job's Slurm state (PENDING, RUNNING, COMPLETED,
    ...), STOPPED after a cancel, NOT_SUBMITTED, GONE (the scheduler has no record) or UNKNOWN.
    """

    name: str
    state: str
    job_id: Optional[str]
    job_state: Optional[str]  # the Slurm state of the latest job, None without a job
    reason: str = ""
    node: str = ""
    stopped: bool = False
    events: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """The job is queued or running (it may still change)."""
        from hpcfed.scheduler import ACTIVE_STATES

        return self.job_state in ACTIVE_STATES

    @classmethod
    def from_row(cls, row: Dict[str, Any]) -> Status:
        return cls(
            name=row["name"],
            state=row["state"],
            job_id=row["job_id"],
            job_state=row["job_state"],
            reason=row["reason"],
            node=row["node"],
            stopped=row["stopped"],
            events=list(row["events"]),
        )


class Deployment:
    """A handle on one deployment (a named role at a site and its Slurm jobs).

    Get one from Site.submit(), deployment(name) or deployments(). A dry run gives a handle
    that was never recorded: `submitted` is False, `plan` and `script` say what would run.
    """

    def __init__(
        self,
        record: Optional[Record],
        *,
        plan: Optional[Plan] = None,
        script: Optional[str] = None,
        store: Optional[DeploymentStore] = None,
    ):
        self._record = record
        self._plan = plan
        self.script = script  # the sbatch script, when this handle submitted (or dry-ran) it
        self._store = store

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r}, job_id={self.job_id!r})"

    @property
    def _records(self) -> DeploymentStore:
        if self._store is None:
            from hpcfed.state import DeploymentStore

            self._store = DeploymentStore()
        return self._store

    @property
    def plan(self) -> Plan:
        """The frozen plan (resources, paths, command) the job runs."""
        if self._plan is None:
            from hpcfed.plan import Plan

            assert self._record is not None
            self._plan = Plan.model_validate(self._record.plan)
        return self._plan

    @property
    def name(self) -> str:
        return self.plan.name if self._record is None else self._record.name

    @property
    def site(self) -> str:
        return self.plan.site

    @property
    def role(self) -> str:
        return self.plan.role

    @property
    def submitted(self) -> bool:
        """False for a dry run: nothing was submitted or recorded."""
        return self._record is not None

    @property
    def job_id(self) -> Optional[str]:
        """The latest Slurm job id (rejoin and resubmits add jobs), None for a dry run."""
        return self._record.job_id if self._record is not None else None

    @property
    def job_ids(self) -> List[str]:
        """Every job of the deployment, oldest first."""
        return [j["job_id"] for j in self._record.jobs] if self._record is not None else []

    @property
    def state(self) -> str:
        """The current state (asks the scheduler; see Status.state)."""
        return self.status().state

    def refresh(self) -> Deployment:
        """Re-read the record (another process, a rejoin or `hpcfed cancel`, may have changed it)."""
        if self._record is not None:
            self._record = self._records.require(self._record.name)
            self._plan = None
        return self

    def status(self, history: bool = False) -> Status:
        """Ask the scheduler now. SchedulerUnavailable when it does not answer (never 'gone')."""
        from hpcfed import deploy

        if self._record is None:
            return Status(name=self.name, state="NOT_SUBMITTED", job_id=None, job_state=None)
        self.refresh()
        rows, errors, _calls = deploy.status_rows([self._record], history=history)
        if errors:
            raise SchedulerUnavailable("; ".join(sorted(set(errors.values()))) + " - state UNKNOWN")
        return Status.from_row(rows[0])

    @overload
    def logs(
        self, follow: Literal[False] = ..., job_id: Optional[str] = ..., interval: float = ...
    ) -> str: ...

    @overload
    def logs(
        self, follow: Literal[True], job_id: Optional[str] = ..., interval: float = ...
    ) -> Iterator[str]: ...

    def logs(
        self, follow: bool = False, job_id: Optional[str] = None, interval: float = 1.0
    ) -> Union[str, Iterator[str]]:
        """The job's output (the latest job unless `job_id`): all of it so far as one string,
        or with follow=True an iterator of new text until the job ends (like `logs --follow`).
        NotFound when the job has written no log yet."""
        from hpcfed import deploy

        record = self._require_record()
        chunks = deploy.read_log(record, job_id, follow=follow, interval=interval)
        if follow:
            return _decoded(chunks)
        return b"".join(chunks).decode(errors="replace")

    def cancel(self) -> None:
        """Cancel the job and mark the deployment stopped (rejoin leaves it alone); a later
        submit of the same name resumes it."""
        from hpcfed import deploy

        self._record = deploy.cancel(self._records, self._require_record().name)

    def wait(self, timeout: Optional[float] = None, interval: float = 2.0) -> Status:
        """Block until the job has ended; its final Status. TimeoutError after `timeout` s.

        A scheduler that stops answering raises SchedulerUnavailable: an unknown state is
        never taken for an ended job.
        """
        deadline = None if timeout is None else _time.monotonic() + timeout
        while True:
            st = self.status()
            if not st.active:
                return st
            if deadline is not None and _time.monotonic() >= deadline:
                raise TimeoutError(f"deployment {self.name}: job {st.job_id} still {st.job_state}")
            _time.sleep(interval)

    def _require_record(self) -> Record:
        if self._record is None:
            from hpcfed.errors import NotFound

            raise NotFound(f"deployment {self.name}: a dry run, never submitted")
        return self._record


def _decoded(chunks: Iterator[bytes]) -> Iterator[str]:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


class Site:
    """A site profile (bundled, or ~/.config/hpcfed/sites/NAME.yaml), loaded and checked once.

    NotFound for an unknown site, ConfigError for a bad profile (naming file and key).
    """

    def __init__(self, name: str):
        from hpcfed.profiles import load_site

        self._loaded: LoadedSite = load_site(name)

    def __repr__(self) -> str:
        return f"Site({self.name!r})"

    @property
    def name(self) -> str:
        return self._loaded.name

    @property
    def profile(self) -> SiteProfile:
        """The merged profile (hpcfed.profiles.schema.SiteProfile)."""
        return self._loaded.profile

    def submit(
        self,
        role: str,
        *,
        gpus: Optional[int] = None,
        kit: Optional[str] = None,
        name: Optional[str] = None,
        framework: Optional[str] = None,
        gpu_type: Optional[str] = None,
        time: Optional[str] = None,
        partition: Optional[str] = None,
        image: Optional[str] = None,
        command: Optional[str] = None,
        tunnel_config: Optional[str] = None,
        forward_local: Sequence[str] = (),
        forward_remote: Sequence[str] = (),
        server_ip: Optional[str] = None,
        inputs: Sequence[str] = (),
        dry_run: bool = False,
    ) -> Deployment:
        """Submit ROLE here, as `hpcfed submit ROLE --site SITE ...` (same keywords as flags;
        `framework` defaults to the one that has ROLE, else nvflare).

        With dry_run=True nothing is submitted or recorded: the handle's `plan` and `script`
        show what would be.
        """
        from hpcfed import submission
        from hpcfed.state import DeploymentStore

        request = submission.SubmitRequest(
            role=role,
            site=self.name,
            framework=framework,
            name=name,
            gpus=gpus,
            gpu_type=gpu_type,
            time=time,
            partition=partition,
            kit=kit,
            image=image,
            command=command,
            tunnel_config=tunnel_config,
            forward_local=tuple(forward_local),
            forward_remote=tuple(forward_remote),
            server_ip=server_ip,
            inputs=tuple(inputs),
            dry_run=dry_run,
        )
        store = DeploymentStore()
        prepared = submission.prepare(request, site=self._loaded, store=store)
        if dry_run:
            return Deployment(None, plan=prepared.plan, script=prepared.script, store=store)
        record, _job_id = submission.submit(prepared, store=store)
        return Deployment(record, plan=prepared.plan, script=prepared.script, store=store)


def deployment(name: str) -> Deployment:
    """The deployment called `name` (NotFound if there is none)."""
    from hpcfed.state import DeploymentStore

    store = DeploymentStore()
    return Deployment(store.require(name), store=store)


def deployments() -> List[Deployment]:
    """Every deployment of this user, by name (what `hpcfed status` lists)."""
    from hpcfed.state import DeploymentStore

    store = DeploymentStore()
    return [Deployment(r, store=store) for r in store.all()]


def rejoin(dry_run: bool = False) -> List[Outcome]:
    """One `hpcfed rejoin` pass: resubmit deployments whose job is gone, exactly once."""
    from hpcfed.rejoin import reconcile

    return reconcile(dry_run=dry_run)
