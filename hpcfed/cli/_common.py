"""Small helpers every sub-command shares: JSON output, tables, progress."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Sequence

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print `data` as JSON when asked, else through the human formatter."""
    if as_json:
        emit_json(data)
    else:
        human(data)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table (no colours: output is often piped or logged)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    """A progress line on stderr, so stdout stays clean for data (--json)."""
    click.echo(f"hpcfed: {message}", err=True)
    sys.stderr.flush()


# Shell completion (click's protocol; `hpcfed completion SHELL` prints the shell's script).
# Called on every TAB press: each reads only directory listings, no profile or record contents.
def complete_sites(ctx, param, incomplete: str):
    """Site profile names: bundled and the user's ~/.config/hpcfed/sites/*.yaml."""
    from hpcfed.profiles.loader import site_names

    return [n for n in site_names() if n.startswith(incomplete)]


def complete_deployments(ctx, param, incomplete: str):
    """Names of the user's recorded deployments."""
    from hpcfed.state import DeploymentStore

    root = DeploymentStore().root
    names = sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []
    return [n for n in names if n.startswith(incomplete)]


def complete_roles(ctx, param, incomplete: str):
    """Names of the roles `hpcfed submit` runs as jobs, of every framework (roles.yaml)."""
    from hpcfed.frameworks import table

    names = {name for roles in table().values() for name, r in roles.items() if r.is_job}
    return [n for n in sorted(names) if n.startswith(incomplete)]
