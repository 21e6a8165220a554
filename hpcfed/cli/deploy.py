"""`hpcfed submit | status | logs | cancel`: deployments by name."""

from __future__ import annotations

import sys

import click

from hpcfed.cli._common import (
    complete_deployments,
    complete_roles,
    complete_sites,
    emit,
    emit_json,
    json_option,
    progress,
    table,
)
from hpcfed.errors import NotFound, SchedulerUnavailable


@click.command()
@click.argument("role", shell_complete=complete_roles)
@click.option(
    "--site",
    required=True,
    shell_complete=complete_sites,
    help="Site profile name (see `hpcfed sites list`).",
)
@click.option("--gpus", type=int, default=None, help="GPUs for the role (default: the role's).")
@click.option("--gpu-type", default=None, help="GPU type, one of the site's gpus.types.")
@click.option(
    "--framework",
    default=None,
    help="Federated-learning framework (default: the one that has ROLE, else nvflare).",
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
    "--server-ip",
    default=None,
    help="The federation server's tunnel address (`hpcfed hub list`): a client role's "
    "forwards follow from it and the role's ports (no -L needed).",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE",
    help="A file the role reads (e.g. a Fed-BioMed researcher's experiment=FILE, a node's "
    "dataset=DESC.json), checked now and copied into the deployment's directory at submit.",
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
    server_ip,
    inputs,
    dry_run,
    as_json,
):
    """Submit a federated-learning ROLE (client, server) as a Slurm job at SITE.

    Builds a plan from the site profile and flags, renders the sbatch script and submits it
    (locally or over SSH, as the profile says); the deployment is then known by its name.

    With --tunnel-config the tunnel's forwards follow from the ports the role serves or dials:
    a server role's port is delivered to 127.0.0.1, a client role's listens on the deployment's
    own loopback address and is carried to --server-ip. -L/-R replace them.

    \b
    Example:
      hpcfed submit client --site ohsu --gpus 2 --kit ~/kits/site-1 --dry-run
      hpcfed submit client --site local --gpus 2 --command 'nvidia-smi -L; sleep 600'
      hpcfed submit client --site ohsu --kit ~/kits/site-1 \\
          --tunnel-config ~/site-1.wg.conf --server-ip 10.220.0.2
    """
    from hpcfed import submission

    request = submission.SubmitRequest(
        role=role,
        site=site,
        framework=framework,
        name=name,
        gpus=gpus,
        gpu_type=gpu_type,
        time=time_,
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
    prepared = submission.prepare(request)
    plan, script = prepared.plan, prepared.script
    if dry_run:
        if as_json:
            emit_json({"plan": plan.model_dump(mode="json"), "script": script})
        else:
            click.echo(script, nl=False)
        return
    dep, job_id = submission.submit(prepared, progress=progress)
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


@click.command()
@click.argument("names", nargs=-1, shell_complete=complete_deployments)
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
    # Adopt the jobs of submits that died between sbatch and their record.
    deps, unanswered, busy = deploy.settle_all_pending(store, deps)
    if names and len(deps) < len(names):
        gone = sorted(set(names) - {d.name for d in deps})
        raise NotFound(f"no deployment named {gone[0]!r} (its submit was interrupted; no job)")
    rows, errors, calls = deploy.status_rows(deps, history=bool(names), busy=busy)
    errors.update({f"pending {i}": e for i, e in enumerate(unanswered)})

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
@click.argument("name", shell_complete=complete_deployments)
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
    from hpcfed.state import DeploymentStore

    dep = DeploymentStore().require(name)
    for chunk in deploy.read_log(dep, job_id, follow=follow, progress=progress):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


@click.command()
@click.argument("name", shell_complete=complete_deployments)
@json_option
def cancel(name, as_json):
    """Cancel a deployment's job and mark it stopped on purpose (rejoin leaves it alone).

    `hpcfed submit` with the same name resumes it later.

    \b
    Example:
      hpcfed cancel local-client
    """
    from hpcfed import deploy
    from hpcfed.state import DeploymentStore

    dep = deploy.cancel(DeploymentStore(), name)
    emit(
        {"name": name, "job_id": dep.job_id, "stopped": True},
        as_json,
        lambda d: click.echo(f"cancelled {d['name']} (job {d['job_id']})"),
    )
