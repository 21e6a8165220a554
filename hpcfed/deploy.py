"""What the deployment commands do, apart from their flags: submit, poll, fetch logs, cancel.

The CLI module (hpcfed.cli.deploy) only parses flags and prints; this is the flow
profile -> plan -> render -> runner/scheduler -> state, and the pieces rejoin reuses.
"""

from __future__ import annotations

import getpass
import uuid
from collections import defaultdict
from typing import (
    TYPE_CHECKING,
    AbstractSet,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Set,
    Tuple,
)

from hpcfed.errors import ConfigError, HpcfedError, NotFound, SchedulerUnavailable
from hpcfed.model import ValidationError
from hpcfed.scheduler import UNKNOWN, JobInfo
from hpcfed.scheduler.target import SchedulerTarget
from hpcfed.state import Deployment, DeploymentStore
from hpcfed.state.lock import LockBusy

if TYPE_CHECKING:  # the plan's models load only where a whole plan is read
    from hpcfed.plan import Plan


def plan_user(site) -> str:
    """The cluster user the plan's paths are for (the SSH user, else who runs hpcfed)."""
    ssh = site.profile.scheduler.ssh
    if site.profile.scheduler.connect == "ssh" and ssh.user:
        return ssh.user
    return getpass.getuser()


def new_deployment_id() -> str:
    return uuid.uuid4().hex[:12]


def connect(target: SchedulerTarget):
    """(runner, scheduler) for a plan's scheduler target."""
    from hpcfed.runner import make_runner
    from hpcfed.scheduler import make_scheduler

    runner = make_runner(target)
    return runner, make_scheduler(target, runner)


def submit_plan(
    plan: Plan, script: str, store: DeploymentStore, progress=lambda m: None
) -> Tuple[Deployment, str]:
    """Submit `script` for `plan`, record it, return (deployment, job id).

    The deployment is locked for the whole submit, so two login nodes cannot submit one name
    twice; a name whose job is still queued or running is refused. The intent is recorded before
    sbatch runs, so a crash in between leaves a record the next command settles.
    """
    with store.lock(plan.name):
        dep = store.get(plan.name)
        runner, scheduler = connect(plan.scheduler)
        try:
            if dep is not None:
                dep = settle_pending(store, dep, scheduler)
            if dep is not None and dep.job_id:
                info = wait_while_completing(scheduler, dep.job_id, progress)
                if info.active:
                    raise ConfigError(
                        f"--name {plan.name}: deployment already has job {dep.job_id} "
                        f"({info.state}); `hpcfed cancel {plan.name}` first or pick another name"
                    )
            before = dep.to_dict() if dep is not None else None
            if dep is None:
                dep = Deployment(
                    name=plan.name,
                    deployment_id=plan.deployment_id,
                    site=plan.site,
                    role=plan.role,
                    framework=plan.framework,
                    plan=plan.model_dump(mode="json"),
                )
            dep.plan = plan.model_dump(mode="json")
            upload_inputs(plan, runner, progress)
            job_id = submit_recorded(
                store, dep, plan, script, runner, scheduler, "submit", before, progress
            )
        finally:
            runner.close()
        dep.stopped = False
        dep.add_event(
            "submitted" if len(dep.jobs) == 1 else "resubmitted",
            f"job {job_id}" if len(dep.jobs) == 1 else f"job {job_id} (hpcfed submit)",
        )
        store.put(dep)
    return dep, job_id


# How long submit waits for a job that is completing (its processes being killed after a
# cancel, epilog running) before refusing the name: Slurm's default KillWait (30 s) plus the
# epilog's time, with room for a slow controller.
COMPLETING_WAIT_S = 120.0


def wait_while_completing(
    scheduler,
    job_id: str,
    progress=lambda m: None,
    limit_s: float = COMPLETING_WAIT_S,
    clock=None,
    sleep=None,
) -> JobInfo:
    """The job's info once it is no longer COMPLETING, or after `limit_s`.

    `hpcfed cancel x && hpcfed submit --name x` must work: scancel returns at once, and the job
    stays COMPLETING until its processes are gone. A new job of the same deployment must not
    run beside the old one's still-dying role (same identity at the server), so submit waits
    for it rather than overlapping or refusing; any other active state is refused at once.
    """
    import time

    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    deadline = clock() + limit_s
    info = scheduler.query([job_id])[job_id]
    while info.state == "COMPLETING" and clock() < deadline:
        progress(f"waiting for job {job_id} to finish completing")
        sleep(1.0)
        info = scheduler.query([job_id])[job_id]
    return info


def submit_recorded(
    store: DeploymentStore,
    dep: Deployment,
    plan: Plan,
    script: str,
    runner,
    scheduler,
    by: str,
    before: Optional[Dict] = None,
    progress=lambda m: None,
) -> str:
    """sbatch between an intent record and the job in `dep` (the caller holds the lock, then
    writes `dep` with its event). `before`: the record as it was, put back when the scheduler
    refused the job (None: there was none, so none is left)."""
    from hpcfed.state.store import now

    dep.pending = {"since": now(), "by": by, "job_name": plan.job_name, "comment": plan.comment}
    store.put(dep)
    try:
        job_id = submit_locked(plan, script, runner, scheduler, progress)
    except SchedulerUnavailable:
        raise  # the job may exist: the intent stays for the next command to settle
    except (HpcfedError, OSError):
        # refused, or never sent: nothing to settle later (an interrupt keeps the intent)
        if before is None:
            store.remove(dep.name)
        else:
            store.put(Deployment.from_dict(before))
        raise
    dep.pending = None
    record_job(dep, job_id, by=by)
    return job_id


def settle_pending(store: DeploymentStore, dep: Deployment, scheduler) -> Optional[Deployment]:
    """Under the deployment's lock: a record still carrying an intent means an hpcfed died
    around its sbatch. Adopt the job carrying the deployment's marker, if the scheduler has one;
    else the submission never happened. Returns the settled deployment, None when it is gone
    (it never had a job); SchedulerUnavailable leaves the intent for later."""
    pending = dep.pending
    if not pending:
        return dep
    found = scheduler.find(pending["job_name"], pending["comment"])
    by = pending.get("by", "submit")
    if found and found not in {j["job_id"] for j in dep.jobs}:
        record_job(dep, found, by="adopted")
        dep.add_event("adopted", f"job {found}: submitted by an interrupted hpcfed {by}")
    else:
        dep.add_event("submit-interrupted", f"an interrupted hpcfed {by} submitted no job")
    dep.pending = None
    if not dep.jobs:
        store.remove(dep.name)
        return None
    store.put(dep)
    return dep


class Settled(NamedTuple):
    """settle_all_pending's answer."""

    deployments: List[Deployment]
    unanswered: List[str]  # why the scheduler could not settle some
    busy: Set[str]  # names whose lock a live hpcfed holds: their submit is still running


def settle_all_pending(store: DeploymentStore, deps: List[Deployment]) -> Settled:
    """Settle every deployment left with an intent (see settle_pending) before it is looked at.
    One that is locked (its submit may still be running: busy, not interrupted) or whose
    scheduler does not answer is left as it is."""
    out = []
    unanswered: List[str] = []
    busy: Set[str] = set()
    for dep in deps:
        settled: Optional[Deployment] = dep
        if dep.pending:
            try:
                with store.lock(dep.name, wait=0):
                    settled = store.get(dep.name)
                    if settled is not None and settled.pending:
                        runner, scheduler = connect(
                            SchedulerTarget.model_validate(settled.plan.get("scheduler"))
                        )
                        try:
                            settled = settle_pending(store, settled, scheduler)
                        finally:
                            runner.close()
            except LockBusy:
                settled = dep
                busy.add(dep.name)
            except SchedulerUnavailable as exc:
                settled = dep
                unanswered.append(str(exc))
            except (HpcfedError, ValidationError):
                settled = dep  # unreadable: reported by whoever reads it next
        if settled is not None:
            out.append(settled)
    return Settled(out, unanswered, busy)


def upload_inputs(plan: Plan, runner, progress=lambda m: None) -> None:
    """Copy the plan's --input files into the deployment's directory, before sbatch (a job never
    starts without them). Only `hpcfed submit` does this: a requeued or rejoined job uses the
    copy made then, whatever happened to the files since."""
    import posixpath

    for item in plan.inputs:
        target = f"{plan.workdir.rstrip('/')}/{item.dest}"
        try:
            with open(item.source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise NotFound(f"--input {item.name}={item.source}: {exc.strerror}") from None
        progress(f"copying {item.source} to {target} on {runner.where}")
        runner.mkdirs(posixpath.dirname(target))
        runner.write_file(target, data)


def submit_locked(plan: Plan, script: str, runner, scheduler, progress=lambda m: None) -> str:
    """The submission itself; the caller holds the deployment's lock."""
    progress(f"creating {plan.workdir} on {runner.where}")
    runner.mkdirs(plan.workdir)
    progress(f"submitting {plan.summary()}")
    return scheduler.submit(script, job_name=plan.job_name, comment=plan.comment)


def record_job(dep: Deployment, job_id: str, by: str = "submit") -> None:
    from hpcfed.state.store import now

    dep.jobs.append({"job_id": job_id, "submitted_at": now(), "by": by})


def job_events(dep: Deployment) -> List[dict]:
    """The events the job itself recorded (events.jsonl in its directory on the cluster):
    started, stopped and why, requeued, running again. Empty when it cannot be read."""
    import json

    from hpcfed.plan import Plan

    plan = Plan.model_validate(dep.plan)
    runner = None
    try:
        runner, _ = connect(plan.scheduler)
        raw = runner.read_file(f"{plan.workdir}/events.jsonl")
    except (OSError, HpcfedError):
        return []
    finally:
        if runner is not None:
            runner.close()
    events = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        detail = e.get("detail", "")
        e["detail"] = f"job {e.get('job_id')}: {detail}" if detail else f"job {e.get('job_id')}"
        events.append(e)
    return events


def poll(deployments: Iterable[Deployment]) -> Tuple[Dict[str, JobInfo], Dict[str, str], int]:
    """Current job info per deployment name: one batched query per scheduler target.

    Returns (name -> JobInfo, target -> error for unreachable schedulers, scheduler calls made).
    A target that does not answer gives UNKNOWN for all its deployments, never GONE.
    """
    groups: Dict[str, List[Deployment]] = defaultdict(list)
    targets: Dict[str, SchedulerTarget] = {}
    infos: Dict[str, JobInfo] = {}
    for dep in deployments:
        if not dep.job_id:
            continue
        try:
            target = SchedulerTarget.model_validate(dep.plan.get("scheduler"))
        except ValidationError:
            # This record alone cannot be asked about; the others still are.
            infos[dep.name] = JobInfo(
                job_id=dep.job_id,
                state=UNKNOWN,
                reason="the record's scheduler settings are unreadable",
            )
            continue
        key = target.model_dump_json()
        groups[key].append(dep)
        targets[key] = target
    errors: Dict[str, str] = {}
    calls = 0
    for key, deps in groups.items():
        runner = scheduler = None
        try:
            runner, scheduler = connect(targets[key])
            answer = scheduler.query([d.job_id for d in deps])
            for d in deps:
                infos[d.name] = answer[d.job_id]
        except SchedulerUnavailable as exc:
            errors[key] = str(exc)
            for d in deps:
                infos[d.name] = JobInfo(job_id=d.job_id or "", state=UNKNOWN, reason=str(exc))
        finally:
            if scheduler is not None:
                calls += scheduler.calls()
            if runner is not None:
                runner.close()
    return infos, errors, calls


def _pending_reason(dep: Deployment, busy: bool) -> str:
    """Why a deployment with no job to ask about has no state yet."""
    if not dep.pending:
        return ""
    if busy:  # its lock is held by a live hpcfed: the submit is running, not lost
        return "another hpcfed is submitting it right now"
    return "a submit was interrupted; not settled yet"


def status_rows(
    deps: List[Deployment], history: bool = False, busy: AbstractSet[str] = frozenset()
) -> Tuple[List[dict], Dict[str, str], int]:
    """One status row per deployment (one scheduler call per target for all of them).

    Returns (rows, target -> error for unreachable schedulers, scheduler calls made). With
    `history`, each row's events are the whole history, the job's own events included. `busy`
    names the deployments whose submit another hpcfed is running (settle_all_pending).
    """
    infos, errors, calls = poll(deps)
    rows = []
    for d in deps:
        info = infos.get(d.name)
        events = d.events
        if history:  # a named deployment: its whole history, the job's own events included
            from hpcfed.state.store import epoch

            events = sorted(d.events + job_events(d), key=lambda e: epoch(e["time"]))
        rows.append(
            {
                "name": d.name,
                "site": d.site,
                "role": d.role,
                "framework": d.framework,
                "job_id": d.job_id,
                "state": "STOPPED"
                if d.stopped and (not info or not info.active)
                else (info.state if info else UNKNOWN if d.pending else "NOT_SUBMITTED"),
                "job_state": info.state if info else None,
                "reason": info.reason if info else _pending_reason(d, d.name in busy),
                "node": info.node if info else "",
                "stopped": d.stopped,
                "jobs": d.jobs,
                "events": events,
            }
        )
    return rows, errors, calls


def read_log(
    dep: Deployment,
    job_id: Optional[str] = None,
    follow: bool = False,
    progress=lambda m: None,
    interval: float = 1.0,
) -> Iterator[bytes]:
    """The output of a deployment's job (the latest unless `job_id`), chunk by chunk.

    With `follow`, keeps reading until the job ends, then reads once more and reports the
    job's final state through `progress`.
    """
    import time

    if not dep.jobs:
        raise NotFound(f"deployment {dep.name} has no job yet")
    job_id = job_id or dep.jobs[-1]["job_id"]
    if job_id not in {j["job_id"] for j in dep.jobs}:
        raise NotFound(f"--job {job_id}: not a job of deployment {dep.name}")
    from hpcfed.plan import Plan  # here, not at the top: `hpcfed status` needs no plan models

    plan = Plan.model_validate(dep.plan)
    path = plan.log_path(job_id)
    runner, scheduler = connect(plan.scheduler)
    offset = 0
    try:
        while True:
            try:
                chunk = runner.read_file(path, offset)
            except FileNotFoundError:
                chunk = b""
                if not follow:
                    raise NotFound(f"{path} on {runner.where}: no log yet (job pending?)") from None
            if chunk:
                offset += len(chunk)
                yield chunk
            if not follow:
                return
            info = scheduler.query([job_id])[job_id]
            if not info.active and info.state != "UNKNOWN":
                # one last read: the job may have written its final lines meanwhile
                try:
                    tail = runner.read_file(path, offset)
                except FileNotFoundError:
                    tail = b""
                if tail:
                    yield tail
                progress(f"job {job_id} {info.state}")
                return
            time.sleep(interval)
    finally:
        runner.close()


def cancel(store: DeploymentStore, name: str) -> Deployment:
    """Cancel a deployment's job and mark it stopped on purpose (rejoin leaves it alone)."""
    from hpcfed.plan import Plan

    with store.lock(name):
        dep = store.require(name)
        plan = Plan.model_validate(dep.plan)
        if dep.pending:  # a crashed submit's job is cancelled too
            runner, scheduler = connect(plan.scheduler)
            try:
                settled = settle_pending(store, dep, scheduler)
            finally:
                runner.close()
            if settled is None:
                raise NotFound(f"deployment {name}: its only submit was interrupted; no job")
            dep = settled
        # Mark first: a rejoin running meanwhile must not bring it back.
        dep.stopped = True
        dep.add_event("stopped", "hpcfed cancel")
        store.put(dep)
        if dep.job_id:
            runner, scheduler = connect(plan.scheduler)
            try:
                scheduler.cancel(dep.job_id)
            finally:
                runner.close()
    return dep
