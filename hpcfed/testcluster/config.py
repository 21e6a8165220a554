"""Render the cluster's config files from its spec. Pure: no file is touched here."""

from __future__ import annotations

from pathlib import Path

import jinja2

from hpcfed.testcluster.spec import ClusterSpec

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
)


def nodelist(spec: ClusterSpec) -> str:
    return f"node[1-{spec.nodes}]" if spec.nodes > 1 else "node1"


def render(spec: ClusterSpec, db_password: str) -> dict[str, str]:
    """file name (relative to PREFIX/etc) -> content."""
    ctx = {"s": spec, "nodelist": nodelist(spec), "db_password": db_password}
    return {
        name: _env.get_template(f"{name}.j2").render(**ctx)
        for name in ("slurm.conf", "gres.conf", "slurmdbd.conf")
    }
