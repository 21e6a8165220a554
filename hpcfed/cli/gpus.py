"""`hpcfed gpus`: the GPU preflight a job runs before its role, on demand on any node."""

from __future__ import annotations

import click

from hpcfed.cli._common import complete_sites, emit, json_option, table


def _human(report: dict) -> None:
    a = report["assignment"]
    if a["count"] is None:
        click.echo("assigned GPUs: none in the environment (not in a GPU job): showing all")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(a["variables"].items()))
        click.echo(f"assigned GPUs: {a['count']} ({shown})")
    if report["skipped"]:
        click.echo(report["skipped"])
    else:
        click.echo(f"NVML driver {report['driver_version']}")
        click.echo(
            table(
                [
                    (
                        g["id"],
                        g.get("name"),
                        g.get("memory_free_mib"),
                        g.get("memory_total_mib"),
                        g.get("ecc_uncorrected_volatile"),
                        len(g.get("processes", [])),
                        "ok" if g["ok"] else "; ".join(g["problems"]),
                    )
                    for g in report["gpus"]
                ],
                ["GPU", "NAME", "FREE MiB", "TOTAL MiB", "ECC", "PROCS", "STATUS"],
            )
        )
        for problem in report["problems"]:
            if not any(problem.endswith(p) for g in report["gpus"] for p in g["problems"]):
                click.echo(f"problem: {problem}")
    click.echo("preflight: " + ("passed" if report["ok"] else "FAILED"))


@click.command()
@click.option(
    "--min-memory",
    "min_memory_mib",
    type=click.IntRange(min=0),
    metavar="MIB",
    help="Fail when an assigned GPU has less free memory than this.",
)
@click.option(
    "--ecc-threshold",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Uncorrected ECC errors (since driver load) tolerated per GPU.",
)
@click.option(
    "--require-nvml",
    is_flag=True,
    help="Fail (exit 10) when NVML is absent instead of reporting that the check is skipped.",
)
@click.option(
    "--site",
    shell_complete=complete_sites,
    help="Take --min-memory and whether NVML is required from this site's profile.",
)
@json_option
def gpus(min_memory_mib, ecc_threshold, require_nvml, site, as_json):
    """Check this node's GPUs the way a job's preflight does before its role starts.

    In a Slurm job only the GPUs Slurm assigned are checked: present, healthy (no pending
    retired pages, ECC errors within the threshold), not busy, with enough free memory.
    Exit code 10 when a check fails.

    \b
    Example:
      hpcfed gpus
      srun --gres=gpu:a40:1 hpcfed gpus --min-memory 40000 --json
    """
    from hpcfed.errors import GpuPreflightFailed
    from hpcfed.gpu.preflight import inspect_gpus

    allow_without_nvml = not require_nvml
    why_required = "--require-nvml"
    if site:
        from hpcfed.profiles import load_site

        settings = load_site(site).profile.preflight
        allow_without_nvml = settings.allow_without_nvml and not require_nvml
        if not settings.allow_without_nvml:
            why_required = f"site {site} has preflight.allow_without_nvml: false"
        if min_memory_mib is None:
            min_memory_mib = settings.min_memory_mib
    report = inspect_gpus(min_memory_mib, ecc_threshold=ecc_threshold, all_if_unassigned=True)
    if report["skipped"] and not allow_without_nvml:
        report["ok"] = False
    emit(report, as_json, _human)
    if not report["ok"]:
        if report["skipped"]:
            raise GpuPreflightFailed(
                f"GPU preflight cannot run: {report['skipped'][len('skipping: ') :]} ({why_required})"
            )
        raise GpuPreflightFailed(f"GPU preflight failed: {'; '.join(report['problems'][:3])}")
