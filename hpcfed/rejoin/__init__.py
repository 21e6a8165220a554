"""Bring lost deployments back, exactly once: `hpcfed rejoin` (from cron or scrontab).

For every deployment the user has not stopped on purpose: ask the scheduler (one batched call per
site); a job that is gone in a way Slurm did not requeue (preempted without requeue, node failure,
time limit, cancelled by someone else, no record at all) is resubmitted from the deployment's
stored plan - after a per-deployment backoff and within a cap per window. Nothing is decided on
an unknown answer. Exactly once across concurrent runs and login nodes: the deployment's lease
lock (exclusive create, NFS-safe) is taken without waiting, the record is re-read and the
scheduler asked again under it, and a newer job carrying the deployment's marker is adopted
instead of submitting another.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from hpcfed.errors import HpcfedError, SchedulerUnavailable
from hpcfed.scheduler import GONE, UNKNOWN, JobInfo
from hpcfed.state import Deployment, DeploymentStore
from hpcfed.state.lock import LockBusy
from hpcfed.state.store import epoch

if TYPE_CHECKING:
    from hpcfed.plan import Plan
    from hpcfed.runner import Runner

BUSY = "another hpcfed is handling it right now"

# Gone in a way Slurm will not bring back by itself: rejoin resubmits.
LOST_STATES = {"PREEMPTED", "NODE_FAIL", "TIMEOUT", "CANCELLED", "BOOT_FAIL", "DEADLINE", GONE}


@dataclass
class Outcome:
    name: str
    action: str  # ok, resubmitted, would-resubmit, adopted, backoff, gave-up, ended, stopped, unknown, busy, error
    detail: str
    job_id: Optional[str] = None
    new_job_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def recent_resubmits(dep: Deployment, window: int, now: float) -> List[float]:
    """Times of rejoin's resubmissions of `dep` within the last `window` seconds, oldest first,
    counted from the user's latest own submit: `hpcfed submit` is what the gave-up message tells
    them to do, and it starts the count again (it used to keep the old ones, so after a restart
    the next loss was given up on, or waited out a backoff, at once)."""
    times: List[float] = []
    for job in dep.jobs:
        if job.get("by") == "rejoin":
            times.append(epoch(job.get("submitted_at", "")))
        else:
            times = []
    return sorted(t for t in times if now - t < window)


def decide(dep: Deployment, info: Optional[JobInfo], now: float) -> Tuple[str, str]:
    """(action, why) for one deployment given the scheduler's answer about its latest job. Pure."""
    if dep.pending:
        return "unknown", "a submit was interrupted and its job is not known yet; nothing decided"
    if dep.stopped:
        return "stopped", "stopped on purpose (hpcfed cancel); left alone"
    if not dep.job_id or info is None:
        return "ended", "no job recorded"
    if info.state == UNKNOWN:
        return "unknown", f"scheduler did not answer ({info.reason}); nothing decided"
    if info.active:
        return "ok", f"job {dep.job_id} {info.state}"
    if info.state not in LOST_STATES:
        return "ended", (
            f"job {dep.job_id} {info.state}: the role ended by itself; not resubmitted "
            f"(`hpcfed submit` to start it again)"
        )
    from hpcfed.profiles.schema import Rejoin

    # A plan recorded before it had a rejoin policy gets the profile schema's defaults.
    policy = Rejoin.model_validate(dep.plan.get("rejoin") or {})
    backoff, max_backoff = policy.backoff, policy.max_backoff
    cap, window = policy.max_resubmits, policy.window
    recent = recent_resubmits(dep, window, now)
    if len(recent) >= cap:
        return "gave-up", (
            f"job {dep.job_id} {info.state}, but already {len(recent)} resubmissions "
            f"in the last {window // 60} min; `hpcfed submit` to start it again"
        )
    if recent:
        wait = min(backoff * 2 ** (len(recent) - 1), max_backoff)
        due = recent[-1] + wait
        if now < due:
            at = datetime.datetime.fromtimestamp(due).strftime("%H:%M:%S")
            return (
                "backoff",
                f"job {dep.job_id} {info.state}; next try after {at} (backoff {wait}s)",
            )
    return "resubmit", f"job {dep.job_id} {info.state}"


def _resubmit(
    store: DeploymentStore,
    name: str,
    now: Callable[[], float],
    dry_run: bool,
    progress: Callable[[str], None],
) -> Outcome:
    """Under the deployment's lock: re-read, re-ask, adopt or submit, record."""
    from hpcfed import deploy
    from hpcfed.plan import Plan
    from hpcfed.render import render

    try:
        lock = store.lock(name, wait=0)
        lock.__enter__()
    except LockBusy:  # a lock that cannot be made at all is an error, not busy
        return Outcome(name, "busy", BUSY)
    try:
        dep = store.require(name)  # fresh: another rejoin may have acted since our first look
        plan = Plan.model_validate(dep.plan)
        runner, scheduler = deploy.connect(plan.scheduler)
        try:
            if dep.pending:  # an hpcfed died around its sbatch since our first look
                settled = deploy.settle_pending(store, dep, scheduler)
                if settled is None or not settled.job_id:
                    return Outcome(name, "ended", "its only submit was interrupted; no job")
                dep = settled
            job_id = dep.job_id
            if job_id is None:
                return Outcome(name, "ended", "no job recorded")
            info = scheduler.query([job_id])[job_id]
            action, why = decide(dep, info, now())
            if action != "resubmit":
                return Outcome(name, action, why, dep.job_id)
            if info.state == GONE:
                # No record (accounting off, job purged): the job's own exit report tells a
                # role that finished by itself from one that was lost.
                report = _exit_report(runner, plan, job_id)
                if report and report.get("reason") == "role exited":
                    return Outcome(
                        name,
                        "ended",
                        (
                            f"job {dep.job_id} left no scheduler record, but its role exited by itself "
                            f"(code {report.get('exit_code')}); not resubmitted"
                        ),
                        dep.job_id,
                    )
            newer = scheduler.find(plan.job_name, plan.comment)
            if newer and int(newer) > int(job_id):
                ninfo = scheduler.query([newer])[newer]
                if ninfo.active:
                    deploy.record_job(dep, newer, by="adopted")
                    dep.add_event(
                        "adopted", f"job {newer} ({ninfo.state}) carries this deployment's marker"
                    )
                    store.put(dep)
                    return Outcome(name, "adopted", f"job {newer} {ninfo.state}", dep.job_id, newer)
            if dry_run:
                return Outcome(name, "would-resubmit", why, dep.job_id)
            old = dep.job_id
            job_id = deploy.submit_recorded(
                store, dep, plan, render(plan), runner, scheduler, "rejoin", dep.to_dict(), progress
            )
        finally:
            runner.close()
        dep.add_event("resubmitted", f"job {job_id} by hpcfed rejoin: {why}")
        store.put(dep)
        return Outcome(name, "resubmitted", why, old, job_id)
    except SchedulerUnavailable as exc:
        return Outcome(name, "unknown", f"scheduler did not answer ({exc}); nothing decided")
    except HpcfedError as exc:
        return Outcome(name, "error", str(exc))
    finally:
        lock.__exit__(None, None, None)


def _exit_report(runner: Runner, plan: Plan, job_id: str) -> Optional[Dict[str, Any]]:
    """The supervisor's status-JOBID.json from the deployment directory, if there is one."""
    import json

    try:
        report = json.loads(runner.read_file(f"{plan.workdir}/status-{job_id}.json"))
    except (OSError, ValueError, HpcfedError):
        return None
    return report if isinstance(report, dict) else None


def reconcile(
    store: Optional[DeploymentStore] = None,
    *,
    dry_run: bool = False,
    now: Optional[Callable[[], float]] = None,
    progress: Callable[[str], None] = lambda m: None,
) -> List[Outcome]:
    """One rejoin pass over every deployment of the user."""
    import time

    from hpcfed import deploy

    store = store or DeploymentStore()
    clock = now or time.time
    deps, _unanswered, busy = deploy.settle_all_pending(store, store.all())
    infos, _errors, _calls = deploy.poll([d for d in deps if not d.stopped])
    outcomes = []
    for dep in deps:
        if dep.name in busy:  # another hpcfed is between its intent and its record right now
            outcomes.append(Outcome(dep.name, "busy", BUSY, dep.job_id))
            continue
        action, why = decide(dep, infos.get(dep.name), clock())
        if action == "resubmit":
            outcomes.append(_resubmit(store, dep.name, clock, dry_run, progress))
        else:
            outcomes.append(Outcome(dep.name, action, why, dep.job_id))
    return outcomes
