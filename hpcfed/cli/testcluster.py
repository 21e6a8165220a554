"""`hpcfed testcluster`: a real single-host Slurm cluster for trying hpcfed and for its tests."""

from __future__ import annotations

import signal
import threading

import click

from hpcfed.cli._common import emit, emit_json, json_option, progress, table
from hpcfed.errors import ExitCode

prefix_option = click.option(
    "--prefix",
    envvar="HPCFED_TESTCLUSTER_PREFIX",
    default=None,
    help="Where the cluster's config, state and logs live (default /var/lib/hpcfed/testcluster).",
)


engine_option = click.option(
    "--engine",
    type=click.Choice(["native", "docker"]),
    envvar="HPCFED_TESTCLUSTER_ENGINE",
    default="native",
    show_default=True,
    help="native: daemons on this machine; docker: one container per host (see README).",
)
slurm_option = click.option(
    "--slurm",
    "slurm_release",
    type=click.Choice(["22.05", "24.11"]),
    envvar="HPCFED_TESTCLUSTER_SLURM",
    default="22.05",
    show_default=True,
    help="Docker engine: the Slurm release (Debian 12: 22.05, Debian 13 trixie: 24.11).",
)


def _docker(slurm_release):
    from hpcfed.testcluster.docker_cluster import DockerCluster
    from hpcfed.testcluster.docker_spec import DockerClusterSpec

    return DockerCluster(DockerClusterSpec.from_env(slurm_release), progress=progress)


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
@engine_option
@slurm_option
@json_option
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay in the foreground after start; stop the cluster on SIGTERM/SIGINT (containers).",
)
def up(prefix, engine, slurm_release, as_json, foreground):
    """Start the cluster (installs missing Debian packages; needs root). Idempotent.

    With --engine docker: builds (or reuses) the images, writes the compose recipe and runs it:
    slurmctld, node1-3, login1-2 (shared /home) and the hub, one container each.

    \b
    Example:
      sudo hpcfed testcluster up && eval "$(hpcfed testcluster env)" && sinfo
      sudo hpcfed testcluster up --engine docker --slurm 24.11
    """
    if engine == "docker":
        _docker_up(slurm_release, as_json)
        return
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
@engine_option
@slurm_option
@json_option
def down(prefix, engine, slurm_release, as_json):
    """Stop the daemons `up` started (by recorded PID). Safe to run twice.

    With --engine docker: removes the cluster's containers, networks and volumes (found by its
    label), nothing else; the images stay for the next `up`.

    \b
    Example:
      sudo hpcfed testcluster down
      sudo hpcfed testcluster down --engine docker --slurm 24.11
    """
    if engine == "docker":
        removed = _docker(slurm_release).down()
        for net in removed["stuck_networks"]:
            click.echo(
                f"hpcfed: warning: network {net} stays: the Docker daemon still counts an "
                "endpoint on it (a Docker fault after a killed container); `up` reuses it, "
                "restarting the Docker daemon removes it",
                err=True,
            )
        emit(
            removed,
            as_json,
            lambda d: click.echo(
                "removed "
                + ", ".join(f"{len(d[k])} {k}" for k in ("containers", "networks", "volumes"))
                + (" (nothing was there)" if not any(d.values()) else "")
            ),
        )
        return
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
@engine_option
@slurm_option
@json_option
def status(prefix, engine, slurm_release, as_json):
    """Show daemons, nodes, partitions, GPUs and running jobs (docker: hosts and networks).

    \b
    Example:
      hpcfed testcluster status --json
      hpcfed testcluster status --engine docker --slurm 24.11
    """
    if engine == "docker":
        _docker_status(slurm_release, as_json)
        return
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
        raise SystemExit(ExitCode.FAILED)


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
@slurm_option
@click.option("--build", is_flag=True, help="Also build (or reuse) the image the recipe names.")
def compose(output, slurm_release, build):
    """Write the Docker test cluster's recipe: docker-compose.yml, slurm.conf and the host script.

    The same file `up --engine docker` runs. The image it names is built locally (no registry):
    by `--build` here, or by `up --engine docker`.

    \b
    Example:
      hpcfed testcluster compose -o slurm-lab --build && cd slurm-lab && docker-compose up -d
    """
    cluster = _docker(slurm_release)
    if build:
        cluster.images.ensure()
    out, files = cluster.write_recipe(output)
    click.echo(f"wrote {', '.join(files)} in {out}")
    click.echo(f"image: {cluster.images.tag()}")
    click.echo(f"start it with: cd {out} && docker-compose -p {cluster.spec.project} up -d")


def _docker_up(slurm_release, as_json):
    data = _docker(slurm_release).up()

    def human(d):
        click.echo(
            f"docker test cluster (Slurm {d['slurm']}) up in {d['seconds']} s "
            f"(images {d['image_seconds']} s, containers {d['start_seconds']} s)"
        )
        click.echo(f"  recipe: {d['compose_file']}")
        click.echo(f"  try: docker exec -it {d['hosts']['login1']} runuser -u hpcuser -- sinfo")

    emit(data, as_json, human)


def _docker_status(slurm_release, as_json):
    info = _docker(slurm_release).status()

    def human(d):
        click.echo(
            f"docker test cluster {d['project']} (Slurm {d['slurm']}, Debian {d['suite']}): "
            f"{'UP' if d['up'] else 'DOWN'}"
        )
        click.echo(
            table(
                [
                    (
                        h["host"],
                        h["container"],
                        h["state"],
                        " ".join(h["addresses"]),
                        d["nodes"].get(h["host"], ""),
                    )
                    for h in d["hosts"]
                ],
                ["HOST", "CONTAINER", "STATE", "ADDRESSES", "SLURM"],
            )
        )
        click.echo()
        click.echo(
            table([(n["name"], n["subnet"]) for n in d["networks"]], ["NETWORK", "SUBNET"])
            if d["networks"]
            else "no networks"
        )
        if d["volumes"]:
            click.echo(f"volumes: {', '.join(d['volumes'])}")

    emit(info, as_json, human)
    if not info["up"]:
        raise SystemExit(ExitCode.FAILED)
