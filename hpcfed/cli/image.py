"""`hpcfed image`: build role images (SIF) from the bundled definition files, list them."""

from __future__ import annotations

import os
import time

import click

from hpcfed.cli._common import complete_sites, emit, json_option, progress, table


def _hpcfed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hpcfed")
    except PackageNotFoundError:
        return "unknown"


@click.group()
def image():
    """Build and list the Apptainer images roles run in.

    \b
    Example:
      hpcfed image build client --framework nvflare --version 2.9.0
      hpcfed image build supernode --framework flower --version 1.42.0
      hpcfed image build server --framework nvflare --version 2.9.0 --base localimage:/var/cache/hpcfed/base-bookworm.sif
      hpcfed image build node --framework fedbiomed --version 6.4.1   # one image, both roles
      hpcfed image list --site ohsu
    """


_site_option = click.option(
    "--site",
    shell_complete=complete_sites,
    help="Store/list in this site's image directory (apptainer.image_dir).",
)
_dir_option = click.option(
    "--image-dir",
    type=click.Path(file_okay=False),
    help="Image directory (overrides the site profile).",
)


@image.command()
@click.argument("role")
@click.option(
    "--framework",
    default=None,
    help="Framework inside the image (default: the one that has ROLE, else nvflare; "
    "ignored for ROLE=base).",
)
@click.option(
    "--version",
    "fw_version",
    help="Exact framework version, e.g. 2.9.0 (required unless ROLE=base).",
)
@click.option(
    "--base",
    help="Base image: docker://IMAGE (needs internet), localimage:/path/base.sif or a "
    "sandbox directory (offline). Default: docker://python:3.11-slim.",
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "lz4"]),
    default="gzip",
    show_default=True,
    help="SIF compression: gzip reads everywhere; zstd/lz4 build faster.",
)
@_site_option
@_dir_option
@click.option("--apptainer", "apptainer_bin", help="Apptainer binary (default: apptainer on PATH).")
@click.option("--dry-run", is_flag=True, help="Show the build plan and the command, build nothing.")
@json_option
def build(
    role, framework, fw_version, base, compression, site, image_dir, apptainer_bin, dry_run, as_json
):
    """Build the image for ROLE (base, or a role of --framework) into the image directory.

    Runs as a normal user (with --fakeroot). The framework version is pinned exactly and
    recorded in the image's labels, with the base it was built from.

    \b
    Example:
      hpcfed image build client --framework nvflare --version 2.9.0 --base localimage:/var/cache/hpcfed/base-bookworm.sif
      hpcfed image build base --base docker://python:3.11-slim --json
    """
    from hpcfed.container.apptainer import find_apptainer
    from hpcfed.container.images import (
        build_argv,
        build_image,
        check_build,
        host_ca_bundle,
        plan_build,
        resolve_image_dir,
    )

    if site and apptainer_bin is None:
        from hpcfed.profiles import load_site

        apptainer_bin = load_site(site).profile.apptainer.binary
    from hpcfed.frameworks import framework_of

    directory, _ = resolve_image_dir(image_dir, site)
    plan = plan_build(
        role,
        framework=framework or framework_of(role),
        version=fw_version,
        base=base,
        image_dir=directory,
        as_root=os.geteuid() == 0,
        compression=compression,
        ca_bundle=host_ca_bundle(os.environ),
        hpcfed_version=_hpcfed_version(),
    )
    if dry_run:
        data = plan.to_dict()
        data["command"] = build_argv(plan, apptainer_bin or "apptainer", plan.output)
        emit(data, as_json, lambda d: click.echo(" ".join(d["command"])))
        return
    check_build(plan)  # bad input first: it is the user's to fix wherever they build
    binary = find_apptainer(apptainer_bin)
    progress(
        f"building {plan.output} from {plan.to_dict()['base']}"
        + (" (fakeroot)" if plan.fakeroot else "")
    )
    started = time.monotonic()
    record = build_image(plan, binary, on_line=lambda line: progress(f"  {line}") if line else None)
    record["build_seconds"] = round(time.monotonic() - started, 1)
    minutes, seconds = divmod(int(record["build_seconds"]), 60)
    progress(f"built {record['path']} ({record['size_mb']} MB) in {minutes}m{seconds:02d}s")
    emit(record, as_json, lambda r: click.echo(r["path"]))


@image.command(name="list")
@_site_option
@_dir_option
@click.option("--apptainer", "apptainer_bin", help="Apptainer binary used to read labels.")
@json_option
def list_(site, image_dir, apptainer_bin, as_json):
    """List the images in the image directory with their labels.

    \b
    Example:
      hpcfed image list
      hpcfed image list --site ohsu --json
    """
    import shutil

    from hpcfed.container.images import list_images, resolve_image_dir

    directory, source = resolve_image_dir(image_dir, site)
    binary = shutil.which(apptainer_bin or "apptainer") or shutil.which("singularity")
    images = list_images(directory, binary)

    def human(data):
        click.echo(f"image directory: {data['image_dir']} ({data['source']})")
        if not data["images"]:
            click.echo("no images (build one with `hpcfed image build`)")
            return
        click.echo(
            table(
                [
                    (
                        i["name"],
                        i["role"],
                        i["framework"],
                        i["framework_version"],
                        i["size_mb"],
                        i["built"],
                    )
                    for i in data["images"]
                ],
                ["NAME", "ROLE", "FRAMEWORK", "VERSION", "MB", "BUILT"],
            )
        )
        if binary is None:
            click.echo("(apptainer not on PATH here: labels not shown)")

    emit({"image_dir": directory, "source": source, "images": images}, as_json, human)
