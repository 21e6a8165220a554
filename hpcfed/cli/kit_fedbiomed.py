"""`hpcfed kit fedbiomed`: Fed-BioMed researcher and node components as kits."""

from __future__ import annotations

import click

from hpcfed.cli._common import emit, json_option, progress


@click.group()
def fedbiomed():
    """Fed-BioMed components (researcher, node) kept as kits for `hpcfed submit`.

    \b
    Example:
      hpcfed kit fedbiomed create researcher --federation onco --site hub --server fl-server --image fedbiomed-6.4.1.sif
      hpcfed kit fedbiomed create node --federation onco --site hospital-a --server fl-server --image fedbiomed-6.4.1.sif
    """


@fedbiomed.command()
@click.argument("role", type=click.Choice(["node", "researcher"]))
@click.option("--federation", required=True, metavar="NAME", help="The federation's name.")
@click.option("--site", required=True, metavar="NAME", help="Store the component for this site.")
@click.option(
    "--server",
    required=True,
    metavar="HOST[:PORT]",
    help="The federation's server name (nodes dial exactly it; port default 50051).",
)
@click.option(
    "--image",
    required=True,
    type=click.Path(dir_okay=False),
    help="The Fed-BioMed image the jobs run (its Fed-BioMed creates the component).",
)
@click.option("--apptainer", "apptainer_bin", help="Apptainer binary (default: on PATH).")
@json_option
def create(role, federation, site, server, image, apptainer_bin, as_json):
    """Create a Fed-BioMed ROLE component for SITE and install it as the site's kit.

    The component (id, etc/config.ini, certificate) is private to you: directories 0700, files
    0600. Creating it again for the same site keeps the previous one for `kit use --rollback`.

    \b
    Example:
      hpcfed kit fedbiomed create node --federation onco --site hospital-a --server fl-server --image ~/fedbiomed-6.4.1.sif
    """
    from hpcfed.container.apptainer import find_apptainer
    from hpcfed.kit.fedbiomed import create_component, plan_component

    plan = plan_component(role, federation=federation, site=site, server=server, image=image)
    binary = find_apptainer(apptainer_bin)
    progress(f"creating the Fed-BioMed {role} component for {site} in {plan.image}")
    kit = create_component(plan, binary, on_line=lambda line: progress(f"  {line}"))
    emit(
        kit.to_dict(),
        as_json,
        lambda k: click.echo(
            f"installed Fed-BioMed {k['role']} component for {k['site']} ({k['federation']}, "
            f"server {k['server_host']}:{k['server_port']}): {k['path']}"
        ),
    )
