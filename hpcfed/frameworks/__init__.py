"""The data-driven table of frameworks and their roles (roles.yaml next to this file)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Dict, Optional, Tuple

import yaml

from hpcfed.errors import ConfigError

TABLE = Path(__file__).with_name("roles.yaml")
DEFAULT_TEMPLATE = "job.sbatch.j2"


@dataclass(frozen=True)
class Role:
    framework: str
    name: str
    command: Tuple[str, ...]
    needs_kit: bool
    default_gpus: int
    stop_command: Optional[Tuple[str, ...]]
    template: str


@cache
def table() -> Dict[str, Dict[str, Role]]:
    data = yaml.safe_load(TABLE.read_text()) or {}
    out: Dict[str, Dict[str, Role]] = {}
    for fw, spec in data.items():
        roles = {}
        for name, r in (spec.get("roles") or {}).items():
            stop = r.get("stop_command")
            roles[name] = Role(
                framework=fw,
                name=name,
                command=tuple(r["command"]),
                needs_kit=bool(r.get("needs_kit", False)),
                default_gpus=int(r.get("default_gpus", 0)),
                stop_command=tuple(stop) if stop else None,
                template=r.get("template", spec.get("template", DEFAULT_TEMPLATE)),
            )
        out[fw] = roles
    return out


def frameworks() -> Tuple[str, ...]:
    return tuple(table())


def role(framework: str, name: str) -> Role:
    """The role `name` of `framework`, or a ConfigError listing what exists."""
    t = table()
    if framework not in t:
        raise ConfigError(f"--framework {framework}: unknown framework (known: {', '.join(t)})")
    roles = t[framework]
    if name not in roles:
        raise ConfigError(f"role {name!r}: not a role of {framework} (known: {', '.join(roles)})")
    return roles[name]
