"""`hpcfed sites list | show`: the site profiles and where each value comes from."""

from __future__ import annotations

import json

import click

from hpcfed.cli._common import complete_sites, emit, json_option, table


@click.group()
def sites():
    """Site profiles: bundled ones, and yours in ~/.config/hpcfed/sites/NAME.yaml.

    \b
    Example:
      hpcfed sites list
      hpcfed sites show local
    """


@sites.command("list")
@json_option
def list_(as_json):
    """List known sites and the files defining them.

    \b
    Example:
      hpcfed sites list --json
    """
    from pathlib import Path

    from hpcfed.profiles import site_names
    from hpcfed.profiles.loader import read_yaml

    rows = []
    for name, files in site_names().items():
        desc = ""
        for f in files:
            try:
                desc = read_yaml(Path(f)).get("description", desc) or desc
            except Exception:  # a broken profile is still listed; `show` says what is wrong
                desc = "(invalid: run `hpcfed sites show " + name + "`)"
        rows.append({"name": name, "files": files, "description": desc})
    emit(
        rows,
        as_json,
        lambda rows: click.echo(
            table([(r["name"], r["description"]) for r in rows], ["SITE", "DESCRIPTION"])
        ),
    )


@sites.command("show")
@click.argument("site", shell_complete=complete_sites)
@json_option
def show(site, as_json):
    """Show the merged profile of SITE with the source of every value.

    Precedence: flags > environment (HPCFED_SITE__KEY__PATH) > user profile > bundled > defaults.

    \b
    Example:
      hpcfed sites show ohsu
      HPCFED_SITE__ACCOUNT=other hpcfed sites show ohsu --json
    """
    from hpcfed.profiles import load_site

    loaded = load_site(site)
    rows = loaded.rows()
    data = {
        "name": site,
        "files": list(loaded.files),
        "profile": loaded.profile.model_dump(),
        "sources": {k: src for k, _, src in rows},
    }
    emit(
        data,
        as_json,
        lambda _d: click.echo(
            table(
                [(k, json.dumps(v) if not isinstance(v, str) else v, src) for k, v, src in rows],
                ["KEY", "VALUE", "SOURCE"],
            )
        ),
    )
