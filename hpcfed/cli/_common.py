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
