"""`hpcfed doctor`: is this site usable, and if not, what to fix."""

from __future__ import annotations

import click

from hpcfed.cli._common import complete_sites, emit, json_option, table
from hpcfed.errors import ConfigError, EnvironmentProblem, HpcfedError, SchedulerUnavailable


def _answer(command, argv):
    """command(argv) - runner.run or sched.check - with one that cannot start, fails to reach
    the scheduler or outlives its timeout as a failed Result: once `scontrol ping` answered, a
    slow sacct is that check's FAIL line, never the end of the whole report."""
    from hpcfed.runner import Result

    try:
        return command(argv)
    except HpcfedError as exc:
        return Result(127, "", str(exc))


def _run(runner, argv):
    return _answer(lambda a: runner.run(a, timeout=20), argv)


def _error_line(res, default: str) -> str:
    return (res.stderr.strip().splitlines() or [default])[-1]


def _checks(site_name: str):
    """Yield (check, ok, detail, fix) for one site; later checks are skipped when earlier fail."""
    from hpcfed import deploy
    from hpcfed.plan import scheduler_target
    from hpcfed.profiles import load_site

    try:
        loaded = load_site(site_name)
    except HpcfedError as exc:
        yield "profile", False, str(exc), "fix the file and key named"
        return
    p = loaded.profile
    yield "profile", True, f"valid ({', '.join(loaded.files)})", ""
    target = scheduler_target(p.scheduler)  # as a plan of this site records it
    try:
        runner, sched = deploy.connect(target)
    except HpcfedError as exc:
        yield "scheduler", False, str(exc), "check scheduler.backend / scheduler.ssh"
        return
    try:
        try:
            yield "scheduler", True, f"{sched.ping()} ({runner.where})", ""
        except HpcfedError as exc:
            fix = (
                "start the test cluster: hpcfed testcluster up"
                if site_name == "local"
                else "check the login node / SLURM_CONF in scheduler.env"
            )
            yield "scheduler", False, str(exc), fix
            return
        res = _answer(
            sched.check, ["sacct", "--noheader", "-X", "--starttime=now", "--format=JobID"]
        )
        if res.returncode == 0:
            yield "accounting", True, "sacct answers", ""
        else:
            yield (
                "accounting",
                False,
                _error_line(res, "sacct failed"),
                "status of ended jobs is limited to squeue's MinJobAge; ask admins for slurmdbd",
            )
        res = _answer(sched.check, ["sinfo", "--noheader", "--format=%P|%G|%a"])
        if res.returncode != 0:
            error = _error_line(res, "sinfo failed")
            yield "partitions", False, error, "run sinfo on the login node; ask the admins"
        else:
            yield from _partition_checks(p, res.stdout)
        # The values as the job uses them: exec'd as written, never expanded by a shell. The
        # value is an argument of `sh`, not part of its script, so `$HOME/x` stays `$HOME/x`.
        binary = p.apptainer.binary
        res = _run(runner, ["sh", "-c", 'command -v -- "$1" && "$1" --version', "sh", binary])
        if res.returncode == 0:
            yield "apptainer", True, res.stdout.strip().replace("\n", " "), ""
        else:
            yield (
                "apptainer",
                False,
                f"{binary} not found on {runner.where}",
                "load it in setup: (e.g. module load apptainer) - it may exist only on compute nodes",
            )
        command = p.hpcfed_command
        res = _run(runner, ["sh", "-c", 'command -v -- "$1"', "sh", command])
        yield (
            "hpcfed on cluster",
            res.returncode == 0,
            res.stdout.strip() or f"{command} not found on {runner.where}",
            "" if res.returncode == 0 else "install hpcfed there and set hpcfed_command",
        )
    finally:
        runner.close()


def _partition_checks(p, sinfo: str):
    """Yield (check, ok, detail, fix) for the profile's partitions and GPUs against sinfo."""
    parts = {}
    for line in sinfo.splitlines():
        name, gres, avail = (line.split("|") + ["", ""])[:3]
        parts[name.rstrip("*")] = gres
    for alias, part in sorted(p.partitions.items()):
        if part in parts:
            yield f"partition {alias}", True, f"{part} (gres {parts[part]})", ""
        else:
            yield (
                f"partition {alias}",
                False,
                f"{part} not in sinfo ({', '.join(parts) or 'none'})",
                f"fix partitions.{alias} in the profile",
            )
    gres = " ".join(parts.values())
    if p.gpus.max_per_node:
        if "gpu" not in gres:
            yield (
                "gpus",
                False,
                "no partition offers gres/gpu",
                "set gpus.max_per_node: 0 or pick GPU partitions",
            )
        else:
            missing = [t for t in p.gpus.types if f"gpu:{t}:" not in gres]
            if missing:
                yield (
                    "gpus",
                    False,
                    f"types {', '.join(missing)} not offered ({gres})",
                    "fix gpus.types",
                )
            else:
                yield "gpus", True, gres, ""


def _reach_checks(tunnel_config: str, server_ip: str, ports):
    """Yield (check, ok, detail, fix): the server's ports through this peer's own tunnel."""
    from hpcfed.tunnel.probe import probe_server

    for port in ports:
        result = probe_server(tunnel_config, server_ip, port)
        fix = (
            ""
            if result.ok
            else "is the server's job running (hpcfed status), and its peer registered at the hub "
            "(hpcfed hub list)?"
        )
        yield f"server {server_ip}:{port}", result.ok, result.detail, fix


def _reach_ports(role_name, framework, ports):
    """The ports to try: --port, else every port the role dials (hpcfed.frameworks)."""
    from hpcfed import frameworks

    if ports:
        return list(ports)
    if not role_name:
        raise ConfigError("--server-ip: say which ports with --role ROLE or --port PORT")
    role = frameworks.role(framework or frameworks.framework_of(role_name), role_name)
    if not role.dials:
        raise ConfigError(
            f"--role {role_name}: the {role.framework} {role.name} dials no server port "
            "(a server role is reached, it does not reach)"
        )
    return [port for _, port in role.dials]


@click.command()
@click.option(
    "--site",
    "sites",
    multiple=True,
    shell_complete=complete_sites,
    help="Site to check (default: every known site).",
)
@click.option(
    "--tunnel-config",
    default=None,
    help="Also check the federation's server through this peer's tunnel (with --server-ip).",
)
@click.option("--server-ip", default=None, help="The server's tunnel address (hpcfed hub list).")
@click.option("--role", "role_name", default=None, help="The ports this role dials are tried.")
@click.option("--framework", default=None, help="The role's framework (default: from the role).")
@click.option(
    "--port",
    "ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    help="A server port to try (repeatable).",
)
@json_option
def doctor(sites, tunnel_config, server_ip, role_name, framework, ports, as_json):
    """Check that a site works: profile, scheduler, accounting, partitions, GPUs, Apptainer.

    With --tunnel-config and --server-ip it also starts this peer's tunnel (userspace, as the
    job does) and checks that the server answers on the ports the role dials - from where it
    runs: on a compute node, `srun hpcfed doctor ...`.

    Prints what to fix; exits 4 when a scheduler does not answer, 7 when anything else fails.

    \b
    Example:
      hpcfed doctor --site local
      hpcfed doctor --site hospital-a --tunnel-config ~/site.wg.conf \\
          --server-ip 10.220.0.2 --role node
    """
    from hpcfed.profiles import site_names

    if bool(tunnel_config) != bool(server_ip):
        raise ConfigError("--tunnel-config and --server-ip: give both (or neither)")
    if server_ip:
        from hpcfed.tunnel import config, forwards

        forwards.parse_tunnel_ip(server_ip)
        config.load(tunnel_config)  # the file, its keys and its mode: one line before any tunnel
    reach = _reach_ports(role_name, framework, ports) if server_ip else []
    # Only the tunnel is checked when it is asked for and no site is named.
    names = list(sites) or ([] if server_ip else list(site_names()))
    results = []
    for name in names:
        for check, ok, detail, fix in _checks(name):
            results.append({"site": name, "check": check, "ok": ok, "detail": detail, "fix": fix})
    if reach:
        for check, ok, detail, fix in _reach_checks(tunnel_config, server_ip, reach):
            results.append({"site": "-", "check": check, "ok": ok, "detail": detail, "fix": fix})
    emit(
        results,
        as_json,
        lambda rs: click.echo(
            table(
                [
                    (
                        r["site"],
                        r["check"],
                        "ok" if r["ok"] else "FAIL",
                        r["detail"] + (f"  -> {r['fix']}" if r["fix"] else ""),
                    )
                    for r in rs
                ],
                ["SITE", "CHECK", "", "DETAIL"],
            )
        ),
    )
    failed = [r for r in results if not r["ok"]]
    if any(r["check"] == "scheduler" for r in failed):
        raise SchedulerUnavailable(f"{len(failed)} check(s) failed; the scheduler does not answer")
    if failed:
        raise EnvironmentProblem(f"{len(failed)} check(s) failed (see FAIL lines)")
