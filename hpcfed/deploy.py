"""What the deployment commands do, apart from their flags: submit, poll, fetch logs, cancel.

The CLI module (hpcfed.cli.deploy) only parses flags and prints; this is the flow
profile -> plan -> render -> runner/scheduler -> state, and the pieces rejoin reuses.
"""

from __future__ import annotations

import getpass
import uuid
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

from hpcfed.errors import ConfigError, HpcfedError, SchedulerUnavailable
from hpcfed.plan import Plan, SchedulerTarget
from hpcfed.scheduler import UNKNOWN, JobInfo
from hpcfed.state import Deployment, DeploymentStore


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
    twice; a name whose job is still queued or running is refused.
    """
    with store.lock(plan.name):
        dep = store.get(plan.name)
        runner, scheduler = connect(plan.scheduler)
        try:
            if dep is not None and dep.job_id:
                info = scheduler.query([dep.job_id])[dep.job_id]
                if info.active:
                    raise ConfigError(
                        f"--name {plan.name}: deployment already has job {dep.job_id} "
                        f"({info.state}); `hpcfed cancel {plan.name}` first or pick another name"
                    )
            job_id = submit_locked(plan, script, runner, scheduler, progress)
        finally:
            runner.close()
        if dep is None:
            dep = Deployment(
                name=plan.name,
                deployment_id=plan.deployment_id,
                site=plan.site,
                role=plan.role,
                framework=plan.framework,
                plan=plan.model_dump(mode="json"),
            )
            dep.add_event("submitted", f"job {job_id}")
        else:
            dep.plan = plan.model_dump(mode="json")
            dep.stopped = False
            dep.add_event("resubmitted", f"job {job_id} (hpcfed submit)")
        record_job(dep, job_id)
        store.put(dep)
    return dep, job_id


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
    for dep in deployments:
        if not dep.job_id:
            continue
        target = SchedulerTarget.model_validate(dep.plan["scheduler"])
        key = target.model_dump_json()
        groups[key].append(dep)
        targets[key] = target
    infos: Dict[str, JobInfo] = {}
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
                infos[d.name] = JobInfo(job_id=d.job_id, state=UNKNOWN, reason=str(exc))
        finally:
            if scheduler is not None:
                calls += scheduler.calls()
            if runner is not None:
                runner.close()
    return infos, errors, calls
