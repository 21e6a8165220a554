"""`hpcfed rejoin` and `hpcfed cron install|show|remove`: bring lost deployments back."""

from __future__ import annotations

import os
import time

import click

from hpcfed.cli._common import emit, json_option, progress, table
from hpcfed.errors import SchedulerUnavailable

LOG_MAX_BYTES = 1 << 20
LOG_KEEP = 3


def _rotate(path: str) -> None:
    """Keep the log under LOG_MAX_BYTES: path -> path.1 -> ... -> path.LOG_KEEP."""
    try:
        if os.path.getsize(path) < LOG_MAX_BYTES:
            return
    except OSError:
        return
    for i in range(LOG_KEEP - 1, 0, -1):
        if os.path.exists(f"{path}.{i}"):
            os.replace(f"{path}.{i}", f"{path}.{i + 1}")
    os.replace(path, f"{path}.1")


def _append_log(path: str, rows: list, unknown: int) -> None:
    """One line per deployment that needed something, then the pass: time, login node (cron may
    run on several that share the home directory and this log), counts."""
    _rotate(path)
    head = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {os.uname().nodename}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for r in rows:
            if r["action"] not in ("ok", "stopped", "ended"):
                job = r["new_job_id"] or r["job_id"] or ""
                f.write(f"{head} {r['name']} {r['action']} {job} {r['detail']}\n")
        resubmitted = sum(r["action"] == "resubmitted" for r in rows)
        f.write(
            f"{head} rejoin pass: {len(rows)} deployments, {resubmitted} resubmitted, "
            f"{unknown} unknown\n"
        )


@click.command()
@click.option("--dry-run", is_flag=True, help="Say what would be resubmitted; submit nothing.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also append the result to this file (rotated at 1 MiB, 3 kept): for cron.",
)
@json_option
def rejoin(dry_run, log_file, as_json):
    """Resubmit deployments whose job is gone (preempted without requeue, node failure, time
    limit, cancelled by someone else) - exactly once, with backoff, never on an unknown answer.

    Deployments stopped with `hpcfed cancel` are left alone. Exit 4 when a scheduler did not
    answer (nothing was decided for its deployments).

    \b
    Example:
      hpcfed rejoin --dry-run
      hpcfed cron install --every 10m
    """
    from hpcfed.rejoin import reconcile

    outcomes = reconcile(dry_run=dry_run, progress=progress)
    rows = [o.to_dict() for o in outcomes]
    unknown = [o for o in outcomes if o.action == "unknown"]

    def human(data):
        rows = data["deployments"]
        if not rows:
            click.echo("no deployments")
            return
        click.echo(
            table(
                [
                    (r["name"], r["action"], r["new_job_id"] or r["job_id"], r["detail"])
                    for r in rows
                ],
                ["NAME", "ACTION", "JOB", "DETAIL"],
            )
        )

    emit({"dry_run": dry_run, "deployments": rows}, as_json, human)
    if log_file:
        _append_log(log_file, rows, len(unknown))
    if unknown:
        raise SchedulerUnavailable(
            f"scheduler unreachable for {', '.join(o.name for o in unknown)}: nothing resubmitted for them"
        )


@click.group()
def cron():
    """Run `hpcfed rejoin` periodically: scrontab when the cluster has it, else your crontab.

    \b
    Example:
      hpcfed cron install --every 10m
      hpcfed cron show
    """


@cron.command("install")
@click.option("--every", default="10m", show_default=True, help="How often: 5m, 10m, 1h ...")
@click.option("--scrontab", "kind", flag_value="scrontab", help="Use Slurm's scrontab.")
@click.option("--crontab", "kind", flag_value="crontab", help="Use this login node's crontab.")
@click.option(
    "--site", default=None, help="scrontab: run the entry with this site's partition and account."
)
@json_option
def install(every, kind, site, as_json):
    """Install (or replace) the rejoin entry; running it twice leaves one entry.

    \b
    Example:
      hpcfed cron install --every 10m --crontab
    """
    from hpcfed import paths
    from hpcfed.rejoin import cron as c

    kind = c.pick(kind)
    log_file = str(paths.private_mkdir(paths.state_dir()) / "rejoin.log")
    options = []
    if kind == "scrontab" and site:
        from hpcfed.profiles import load_site

        p = load_site(site).profile
        if p.partitions.get("default"):
            options.append(f"--partition={p.partitions['default']}")
        if p.account:
            options.append(f"--account={p.account}")
    entry = c.block(kind, every, log_file, options)
    c.write(kind, c.strip(c.read(kind)) + entry)
    emit(
        {"kind": kind, "entry": entry, "log_file": log_file},
        as_json,
        lambda d: click.echo(
            f"installed in {d['kind']} (log: {d['log_file']}):\n" + "\n".join(d["entry"])
        ),
    )


@cron.command("show")
@click.option("--scrontab", "kind", flag_value="scrontab", help="Look in scrontab.")
@click.option("--crontab", "kind", flag_value="crontab", help="Look in the crontab.")
@json_option
def show(kind, as_json):
    """Show the installed rejoin entry (exit 8 when there is none).

    \b
    Example:
      hpcfed cron show
    """
    from hpcfed.errors import NotFound
    from hpcfed.rejoin import cron as c

    kind = c.pick(kind)
    entry = c.ours(c.read(kind))
    emit(
        {"kind": kind, "entry": entry},
        as_json,
        lambda d: click.echo("\n".join(d["entry"]) if d["entry"] else f"no hpcfed entry in {kind}"),
    )
    if not entry:
        raise NotFound(f"no hpcfed rejoin entry in {kind} (`hpcfed cron install`)")


@cron.command("remove")
@click.option("--scrontab", "kind", flag_value="scrontab", help="Remove from scrontab.")
@click.option("--crontab", "kind", flag_value="crontab", help="Remove from the crontab.")
def remove(kind):
    """Remove the rejoin entry (other entries stay).

    \b
    Example:
      hpcfed cron remove
    """
    from hpcfed.rejoin import cron as c

    kind = c.pick(kind)
    c.write(kind, c.strip(c.read(kind)))
    click.echo(f"removed the hpcfed entry from {kind}")
