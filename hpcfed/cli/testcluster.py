"""`hpcfed testcluster`: a real single-host Slurm cluster for trying hpcfed and for its tests."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import click

from hpcfed.cli._common import emit, emit_json, json_option, progress, table
from hpcfed.paths import PACKAGE_DIR

prefix_option = click.option(
    "--prefix",
    envvar="HPCFED_TESTCLUSTER_PREFIX",
    default=None,
    help="Where the cluster's config, state and logs live (default /var/lib/hpcfed/testcluster).",
)


def _cluster(prefix):
    from hpcfed.testcluster.cluster import TestCluster
    from hpcfed.testcluster.spec import ClusterSpec

    return TestCluster(ClusterSpec.from_env(prefix), progress=progress)


@click.group()
def testcluster():
    """A real Slurm cluster on this machine: munge, MariaDB, slurmdbd, slurmctld, three slurmds.

    Nodes node[1-3] each have four fake typed GPUs (gpu:a40:4, real character devices);
    partitions: debug (default), low (preemptable: REQUEUE, GraceTime 10 s), high (preempts low).
    A non-root user `hpcuser` (account fedlab) can submit.

    \b
    Example (as root):
      hpcfed testcluster up
      eval "$(hpcfed testcluster env)"
      runuser -u hpcuser -- sbatch --gres=gpu:a40:2 --wrap 'echo $CUDA_VISIBLE_DEVICES'
      hpcfed testcluster down
    """


@testcluster.command()
@prefix_option
@json_option
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay in the foreground after start; stop the cluster on SIGTERM/SIGINT (containers).",
)
def up(prefix, as_json, foreground):
    """Start the cluster (installs missing Debian packages; needs root). Idempotent.

    \b
    Example:
      sudo hpcfed testcluster up && eval "$(hpcfed testcluster env)" && sinfo
    """
    cluster = _cluster(prefix)
    result = cluster.up()
    spec = cluster.spec
    data = {
        "prefix": spec.prefix,
        "slurm_conf": spec.slurm_conf,
        "user": spec.user,
        "account": spec.account,
        "env": spec.env(),
        "already_running": result.already_running,
        "started": result.started,
        "reused": result.reused,
        "seconds": round(result.seconds, 2),
    }

    def human(d):
        if d["already_running"]:
            click.echo(f"test cluster already running ({spec.prefix})")
        else:
            click.echo(f"test cluster up in {d['seconds']} s: {', '.join(d['started'])}")
        click.echo('point Slurm clients at it with:  eval "$(hpcfed testcluster env)"')
        click.echo(
            f"  (sets SLURM_CONF={spec.slurm_conf}); submit as the non-root user "
            f"{spec.user} (account {spec.account})"
        )

    emit(data, as_json, human)
    if foreground:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(3600):
            pass
        progress("stopping the test cluster")
        cluster.down()


@testcluster.command()
@prefix_option
@json_option
def down(prefix, as_json):
    """Stop the daemons `up` started (by recorded PID). Safe to run twice.

    \b
    Example:
      sudo hpcfed testcluster down
    """
    stopped = _cluster(prefix).down()
    emit(
        {"stopped": stopped},
        as_json,
        lambda d: click.echo(
            f"stopped: {', '.join(d['stopped'])}"
            if d["stopped"]
            else "test cluster was not running: nothing to stop"
        ),
    )


@testcluster.command()
@prefix_option
@json_option
def status(prefix, as_json):
    """Show daemons, nodes, partitions, GPUs and running jobs.

    \b
    Example:
      hpcfed testcluster status --json
    """
    info = _cluster(prefix).status()

    def human(d):
        click.echo(f"test cluster at {d['prefix']}: {'UP' if d['up'] else 'DOWN'}")
        if d["daemons"]:
            click.echo(
                table(
                    [
                        (x["name"], x["pid"], "running" if x["running"] else "stopped")
                        for x in d["daemons"]
                    ],
                    ["DAEMON", "PID", "STATE"],
                )
            )
        if d["nodes"]:
            click.echo()
            click.echo(
                table(
                    [
                        (n["name"], n["state"], n["cpus"], n["memory_mb"], n["gres"])
                        for n in d["nodes"]
                    ],
                    ["NODE", "STATE", "CPUS", "MEM_MB", "GPUS"],
                )
            )
            click.echo()
            click.echo(
                table(
                    [
                        (
                            p["name"] + ("*" if p["default"] else ""),
                            p["priority_tier"],
                            p["preempt_mode"],
                            p["grace_time_s"],
                        )
                        for p in d["partitions"]
                    ],
                    ["PARTITION", "TIER", "PREEMPT", "GRACE_S"],
                )
            )
            click.echo()
            click.echo(
                table(
                    [
                        (
                            j["id"],
                            j["user"],
                            j["partition"],
                            j["name"],
                            j["state"],
                            j["gres"],
                            j["nodes"],
                        )
                        for j in d["jobs"]
                    ],
                    ["JOBID", "USER", "PARTITION", "NAME", "STATE", "GRES", "NODES"],
                )
                if d["jobs"]
                else "no jobs"
            )

    emit(info, as_json, human)
    if not info["up"]:
        raise SystemExit(1)


@testcluster.command()
@prefix_option
@json_option
def env(prefix, as_json):
    """Print shell lines that point Slurm clients at the cluster.

    \b
    Example:
      eval "$(hpcfed testcluster env)"
    """
    from hpcfed.testcluster.spec import ClusterSpec

    variables = ClusterSpec.from_env(prefix).env()
    if as_json:
        emit_json(variables)
    else:
        for k, v in variables.items():
            click.echo(f"export {k}={v}")


@testcluster.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="hpcfed-testcluster",
    show_default=True,
    help="Directory to write the compose recipe into.",
)
def compose(output):
    """Write a docker-compose recipe of the same cluster, for laptops with Docker.

    Not exercised by hpcfed's CI (no Docker engine there).

    \b
    Example:
      hpcfed testcluster compose -o slurm-lab && cd slurm-lab && docker compose up -d --build
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    src = PACKAGE_DIR / "testcluster" / "compose"
    for name in ("Dockerfile", "docker-compose.yml"):
        shutil.copy(src / name, out / name)
    # The container runs this very package (pure-Python part) in the foreground.
    shutil.copytree(
        PACKAGE_DIR,
        out / "hpcfed",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.so"),
    )
    click.echo(f"wrote {out}/Dockerfile, {out}/docker-compose.yml and {out}/hpcfed/")
    click.echo(f"start it with: cd {out} && docker compose up -d --build")
