"""`hpcfed submit | status | logs | cancel`: deployments by name."""

from __future__ import annotations

import sys
import time

import click

from hpcfed.cli._common import emit, emit_json, json_option, progress, table
from hpcfed.errors import ConfigError, NotFound, SchedulerUnavailable


def _resolve_kit(kit, site, role, command, loaded):
    """(kit dir, (server host, port), declared GPUs): --kit, else the kit installed for the site.

    The kit's server address decides what the tunnel and the container's /etc/hosts provide; its
    GPU capacity is checked at submit, since NVFlare refuses a mismatch only at start-up and then
    exits 0. A kit on the cluster only (submit over SSH) is used as given, unread.
    """
    import os
    from pathlib import Path

    if command is not None or not role.needs_kit:
        return kit, None, None
    if kit is None:
        from hpcfed.kit.store import find_kit

        found = find_kit(site, role.name)
        if found is None:
            raise NotFound(
                f"--kit: no {role.framework} {role.name} kit installed for site {site}; pull it with "
                f"`hpcfed kit pull --role {role.name} --site NAME --as {site}` or give --kit DIR"
            )
        return found.path, (found.server_host, found.server_port), found.gpu_capacity
    local = os.path.expanduser(kit)
    if loaded.profile.scheduler.connect != "local" or not os.path.isdir(local):
        return kit, None, None
    from hpcfed.kit.checks import gpu_capacity, server_address

    try:
        host, port = server_address(Path(local), role.name)
        return kit, (host, port) if host else None, gpu_capacity(Path(local))
    except Exception:  # not an NVFlare kit layout: the job's own kit checks will say why
        return kit, None, None


@click.command()
@click.argument("role")
@click.option("--site", required=True, help="Site profile name (see `hpcfed sites list`).")
@click.option("--gpus", type=int, default=None, help="GPUs for the role (default: the role's).")
@click.option("--gpu-type", default=None, help="GPU type, one of the site's gpus.types.")
@click.option(
    "--framework", default="nvflare", show_default=True, help="Federated-learning framework."
)
@click.option("--name", default=None, help="Deployment name (default: SITE-ROLE).")
@click.option("--time", "time_", default=None, help="Time limit, e.g. 2h, 1d, 1-00:00:00.")
@click.option(
    "--partition", default=None, help="Partition, or an alias from the profile's partitions."
)
@click.option("--kit", default=None, help="Startup kit directory (a path on the cluster).")
@click.option("--image", default=None, help="Apptainer image (.sif) to run the role in.")
@click.option(
    "--command",
    "command",
    default=None,
    help="Run this shell command instead of the framework's role (debugging; no kit needed).",
)
@click.option("--tunnel-config", default=None, help="Tunnel config file (a path on the cluster).")
@click.option("--forward-local", "-L", multiple=True, help="Tunnel forward [bind:]port=ip:port.")
@click.option(
    "--forward-remote", "-R", multiple=True, help="Tunnel reverse forward port=host:port."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the sbatch script (with --json: plan and script); submit nothing.",
)
@json_option
def submit(
    role,
    site,
    gpus,
    gpu_type,
    framework,
    name,
    time_,
    partition,
    kit,
    image,
    command,
    tunnel_config,
    forward_local,
    forward_remote,
    dry_run,
    as_json,
):
    """Submit a federated-learning ROLE (client, server) as a Slurm job at SITE.

    Builds a plan from the site profile and flags, renders the sbatch script and submits it
    (locally or over SSH, as the profile says); the deployment is then known by its name.

    \b
    Example:
      hpcfed submit client --site ohsu --gpus 2 --kit ~/kits/site-1 --dry-run
      hpcfed submit client --site local --gpus 2 --command 'nvidia-smi -L; sleep 600'
    """
    import os

    from hpcfed import deploy, frameworks
    from hpcfed.names import check_name
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site
    from hpcfed.render import render
    from hpcfed.state import DeploymentStore

    loaded = load_site(site)
    the_role = frameworks.role(framework, role)
    name = check_name("--name", name or f"{site}-{role}")
    store = DeploymentStore()
    existing = None if dry_run else store.get(name)
    if existing is not None and existing.site != site:
        raise ConfigError(f"--name {name}: already a deployment at site {existing.site}")
    dep_id = (
        existing.deployment_id
        if existing
        else ("dry-run" if dry_run else deploy.new_deployment_id())
    )
    if loaded.profile.scheduler.connect == "local":
        for flag, path in (("--kit", kit), ("--image", image), ("--tunnel-config", tunnel_config)):
            if path and not os.path.exists(os.path.expanduser(path)):
                raise NotFound(f"{flag} {path}: no such file or directory")
    kit, server_address, capacity = _resolve_kit(kit, site, the_role, command, loaded)
    plan = build_plan(
        site=loaded,
        role=the_role,
        name=name,
        deployment_id=dep_id,
        user=deploy.plan_user(loaded),
        gpus=gpus,
        gpu_type=gpu_type,
        time=time_,
        partition=partition,
        kit=_abs(kit, loaded),
        image=_abs(image, loaded),
        command=command,
        tunnel_config=_abs(tunnel_config, loaded),
        local_forwards=tuple(forward_local),
        remote_forwards=tuple(forward_remote),
        server_address=server_address,
    )
    if plan.kit and capacity is not None:
        from hpcfed.kit.workspace import check_gpu_capacity

        check_gpu_capacity(capacity, plan.resources.gpus, where=f"the kit {plan.kit}")
    script = render(plan)
    if dry_run:
        if as_json:
            emit_json({"plan": plan.model_dump(mode="json"), "script": script})
        else:
            click.echo(script, nl=False)
        return
    dep, job_id = deploy.submit_plan(plan, script, store, progress=progress)
    emit(
        {
            "name": dep.name,
            "job_id": job_id,
            "site": dep.site,
            "role": dep.role,
            "deployment_id": dep.deployment_id,
            "workdir": plan.workdir,
            "log": plan.log_path(job_id),
        },
        as_json,
        lambda d: click.echo(f"submitted {d['name']} as job {d['job_id']} (log: {d['log']})"),
    )


def _abs(path, loaded):
    """Local paths become absolute (the job runs elsewhere); remote ones are taken as given."""
    import os

    if path and loaded.profile.scheduler.connect == "local":
        return os.path.abspath(os.path.expanduser(path))
    return path


@click.command()
@click.argument("names", nargs=-1)
@json_option
def status(names, as_json):
    """Show deployments and their jobs' state (one scheduler call per site for all of them).

    A scheduler that does not answer shows UNKNOWN (exit code 4), never "gone".

    \b
    Example:
      hpcfed status
      hpcfed status local-client --json
    """
    from hpcfed import deploy
    from hpcfed.state import DeploymentStore

    store = DeploymentStore()
    if names:
        deps = [store.require(n) for n in names]
    else:
        deps = store.all()
    infos, errors, calls = deploy.poll(deps)
    rows = []
    for d in deps:
        info = infos.get(d.name)
        events = d.events
        if names:  # a named deployment: its whole history, the job's own events included
            from hpcfed.state.store import epoch

            events = sorted(d.events + deploy.job_events(d), key=lambda e: epoch(e["time"]))
        rows.append(
            {
                "name": d.name,
                "site": d.site,
                "role": d.role,
                "framework": d.framework,
                "job_id": d.job_id,
                "state": "STOPPED"
                if d.stopped and (not info or not info.active)
                else (info.state if info else "NOT_SUBMITTED"),
                "job_state": info.state if info else None,
                "reason": info.reason if info else "",
                "node": info.node if info else "",
                "stopped": d.stopped,
                "jobs": d.jobs,
                "events": events,
            }
        )

    def human(data):
        rows = data["deployments"]
        if not rows:
            click.echo("no deployments (submit one with `hpcfed submit`)")
            return
        click.echo(
            table(
                [
                    (
                        r["name"],
                        r["site"],
                        r["role"],
                        r["job_id"],
                        r["state"],
                        r["node"] or r["reason"],
                    )
                    for r in rows
                ],
                ["NAME", "SITE", "ROLE", "JOB", "STATE", "NODE/REASON"],
            )
        )
        if names:
            for r in rows:
                click.echo(f"\n{r['name']} history:")
                for e in r["events"]:
                    click.echo(f"  {e['time']}  {e['event']}  {e['detail']}")

    emit(
        {"deployments": rows, "scheduler_calls": calls, "unreachable": sorted(errors.values())},
        as_json,
        human,
    )
    if errors:
        raise SchedulerUnavailable("; ".join(sorted(set(errors.values()))) + " - state UNKNOWN")


@click.command()
@click.argument("name")
@click.option(
    "--job", "job_id", default=None, help="An earlier job of the deployment (default: the latest)."
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
def logs(name, job_id, follow):
    """Print the output of a deployment's job (fetched over SSH for remote sites).

    \b
    Example:
      hpcfed logs local-client
      hpcfed logs local-client --follow
    """
    from hpcfed import deploy
    from hpcfed.plan import Plan
    from hpcfed.state import DeploymentStore

    dep = DeploymentStore().require(name)
    if not dep.jobs:
        raise NotFound(f"deployment {name} has no job yet")
    job_id = job_id or dep.job_id
    if job_id not in {j["job_id"] for j in dep.jobs}:
        raise NotFound(f"--job {job_id}: not a job of deployment {name}")
    plan = Plan.model_validate(dep.plan)
    path = plan.log_path(job_id)
    runner, scheduler = deploy.connect(plan.scheduler)
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
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            if not follow:
                return
            info = scheduler.query([job_id])[job_id]
            if not info.active and info.state != "UNKNOWN":
                # one last read: the job may have written its final lines meanwhile
                try:
                    tail = runner.read_file(path, offset)
                except FileNotFoundError:
                    tail = b""
                sys.stdout.buffer.write(tail)
                sys.stdout.flush()
                progress(f"job {job_id} {info.state}")
                return
            time.sleep(1.0)
    finally:
        runner.close()


@click.command()
@click.argument("name")
@json_option
def cancel(name, as_json):
    """Cancel a deployment's job and mark it stopped on purpose (rejoin leaves it alone).

    `hpcfed submit` with the same name resumes it later.

    \b
    Example:
      hpcfed cancel local-client
    """
    from hpcfed import deploy
    from hpcfed.plan import Plan
    from hpcfed.state import DeploymentStore

    store = DeploymentStore()
    with store.lock(name):
        dep = store.require(name)
        plan = Plan.model_validate(dep.plan)
        # Mark first: a rejoin running meanwhile must not bring it back.
        dep.stopped = True
        dep.add_event("stopped", "hpcfed cancel")
        store.put(dep)
        if dep.job_id:
            runner, scheduler = deploy.connect(plan.scheduler)
            try:
                scheduler.cancel(dep.job_id)
            finally:
                runner.close()
    emit(
        {"name": name, "job_id": dep.job_id, "stopped": True},
        as_json,
        lambda d: click.echo(f"cancelled {d['name']} (job {d['job_id']})"),
    )
