"""The data-driven table of frameworks and their roles (roles.yaml next to this file).

A role says what differs between frameworks, so the rest of hpcfed never branches on a role's or
framework's name: its side (server / client / admin), the ports it serves or dials (from which
the tunnel's forwards and the container's /etc/hosts follow), the kind of credentials it needs,
its start and stop commands, its environment, and the per-job local ports it must not share
with another job on the node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Dict, Optional, Tuple

from hpcfed.errors import ConfigError, ExitCode
from hpcfed.yamlfile import safe_load

TABLE = Path(__file__).with_name("roles.yaml")
DEFAULT_TEMPLATE = "job.sbatch.j2"
SIDES = ("server", "client", "admin")
LOCAL_BIND = "127.0.0.1"
# What a user calls each kind of credentials (and where they come from).
CREDENTIALS = {
    "nvflare-kit": "startup kit",
    "flower-superlink": "Flower SuperLink credentials (hpcfed kit flower ca)",
    "flower-supernode": "Flower SuperNode key (hpcfed kit flower keygen)",
    "flower-operator": "Flower operator credentials (hpcfed kit flower ca)",
    "fedbiomed-researcher": "Fed-BioMed researcher component (hpcfed kit fedbiomed create)",
    "fedbiomed-node": "Fed-BioMed node component (hpcfed kit fedbiomed create)",
}
_LOCAL_PORT = re.compile(r"\{local_port:([a-z][a-z0-9_-]*)\}")


@dataclass(frozen=True)
class Failure:
    """A failure the framework reports only in its output: text to look for, what it means."""

    pattern: str
    code: int  # the framework's own code: named in the job's log, never the job's exit code
    message: str
    exit: ExitCode = ExitCode.ROLE_FAILED  # the job's exit code (a process keeps only 0-255)
    retry_for: int = 0  # start the role again while the job has run less than this (seconds)


@dataclass(frozen=True)
class Input:
    """A file the role's command reads from its workspace, given at submit (`--input NAME=FILE`)
    and copied there: `dest` is a file name, or a folder (ending in /) for a `multiple` input."""

    name: str
    dest: str
    required: bool = False
    multiple: bool = False
    check: Optional[str] = None  # the name of a content check (hpcfed.frameworks.inputs)


@dataclass(frozen=True)
class Role:
    framework: str
    name: str
    side: str  # server | client | admin
    command: Tuple[str, ...]
    credentials: Optional[str]  # the kind of credentials, None: starts without any
    default_gpus: int
    stop_command: Optional[Tuple[str, ...]]
    template: str
    serves: Tuple[Tuple[str, int], ...] = ()  # (port name, default number)
    dials: Tuple[Tuple[str, int], ...] = ()
    local_ports: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    failures: Tuple[Failure, ...] = ()
    inputs: Tuple[Input, ...] = ()

    @property
    def needs_kit(self) -> bool:
        return self.credentials is not None

    @property
    def is_job(self) -> bool:
        """Admin roles run where the operator is, never as a Slurm job."""
        return self.side != "admin"

    @property
    def federation_port(self) -> Optional[int]:
        """The default number of the (first) port the role serves or dials."""
        ports = self.serves or self.dials
        return ports[0][1] if ports else None

    def forwards(
        self, server_ip: str, port: int, listen_port: Optional[int] = None, bind: str = LOCAL_BIND
    ) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(-L specs, -R specs) of the tunnel for the federation port `port`.

        A server side role is reached at its tunnel address (-R PORT=127.0.0.1:LISTEN); the
        others reach the server's tunnel address `server_ip` through a local listener on `bind`.
        """
        if self.side == "server":
            return (), (f"{port}={LOCAL_BIND}:{listen_port or port}",)
        return (f"{bind}:{port}={server_ip}:{port}",), ()


def credentials_name(role: Role) -> str:
    return CREDENTIALS.get(role.credentials or "", role.credentials or "credentials")


def _ports(fw: str, role: str, names, ports: Dict[str, int]) -> Tuple[Tuple[str, int], ...]:
    out = []
    for n in names or ():
        if n not in ports:
            raise ConfigError(f"{TABLE}: {fw}.{role}: port {n!r} is not in {fw}.ports")
        out.append((n, int(ports[n])))
    return tuple(out)


def _role(fw: str, spec: dict, name: str, r: dict) -> Role:
    side = r.get("side")
    if side not in SIDES:
        raise ConfigError(f"{TABLE}: {fw}.{name}.side {side!r}: one of {', '.join(SIDES)}")
    ports = spec.get("ports") or {}
    stop = r.get("stop_command")
    env = dict(spec.get("env") or {}, **(r.get("env") or {}))
    local = tuple(r.get("local_ports") or ())
    command = tuple(str(a) for a in r["command"])
    used = {m for a in command for m in _LOCAL_PORT.findall(a)}
    if used != set(local):
        raise ConfigError(
            f"{TABLE}: {fw}.{name}: command uses local ports {sorted(used)}, "
            f"local_ports lists {sorted(local)}"
        )
    return Role(
        framework=fw,
        name=name,
        side=side,
        command=command,
        credentials=r.get("credentials"),
        default_gpus=int(r.get("default_gpus", 0)),
        stop_command=tuple(stop) if stop else None,
        template=r.get("template", spec.get("template", DEFAULT_TEMPLATE)),
        serves=_ports(fw, name, r.get("serves"), ports),
        dials=_ports(fw, name, r.get("dials"), ports),
        local_ports=local,
        env=tuple(sorted((k, str(v)) for k, v in env.items())),
        failures=tuple(_failure(fw, name, f) for f in r.get("failures") or ()),
        inputs=tuple(_input(fw, name, n, i) for n, i in (r.get("inputs") or {}).items()),
    )


def _input(fw: str, role: str, name: str, i: dict) -> Input:
    multiple = bool(i.get("multiple"))
    dest = str(i.get("dest") or "")
    if (
        not dest
        or dest.startswith("/")
        or ".." in dest.split("/")
        or multiple != dest.endswith("/")
    ):
        raise ConfigError(
            f"{TABLE}: {fw}.{role}.inputs.{name}.dest {dest!r}: a relative file name, or a "
            "folder ending in / for a multiple input"
        )
    check = i.get("check")
    if check is not None:
        from hpcfed.frameworks.inputs import CHECKS

        if check not in CHECKS:
            raise ConfigError(
                f"{TABLE}: {fw}.{role}.inputs.{name}.check {check!r}: one of {', '.join(CHECKS)}"
            )
    return Input(
        name=name,
        dest=dest,
        required=bool(i.get("required")),
        multiple=multiple,
        check=check,
    )


def _failure(fw: str, role: str, f: dict) -> Failure:
    label = f.get("exit", ExitCode.ROLE_FAILED.label)
    exit_code = ExitCode.from_label(str(label))
    if exit_code is None:
        known = ", ".join(c.label for c in ExitCode)
        raise ConfigError(f"{TABLE}: {fw}.{role}.failures: exit {label!r}: one of {known}")
    return Failure(
        pattern=str(f["match"]),
        code=int(f["code"]),
        message=str(f["message"]),
        exit=exit_code,
        retry_for=int(f.get("retry_for", 0)),
    )


@cache
def table() -> Dict[str, Dict[str, Role]]:
    return {
        fw: {name: _role(fw, spec, name, r) for name, r in (spec.get("roles") or {}).items()}
        for fw, spec in _framework_specs().items()
    }


@cache
def _framework_specs() -> Dict[str, dict]:
    return safe_load(TABLE.read_text()) or {}


def one_image(framework: str) -> bool:
    """All roles of `framework` run one image (<framework>.def), built once per version."""
    return bool((_framework_specs().get(framework) or {}).get("one_image"))


def frameworks() -> Tuple[str, ...]:
    return tuple(table())


def known() -> str:
    """What exists, on one line: `nvflare (client, server), flower (...)`."""
    return "; ".join(f"{fw}: {', '.join(roles)}" for fw, roles in table().items())


def role(framework: str, name: str) -> Role:
    """The role `name` of `framework`, or a ConfigError listing what exists."""
    t = table()
    if framework not in t:
        raise ConfigError(f"--framework {framework}: unknown framework (known: {known()})")
    roles = t[framework]
    if name not in roles:
        raise ConfigError(f"role {name!r}: not a role of {framework} (known: {known()})")
    return roles[name]


def job_role(framework: str, name: str) -> Role:
    """Like role(), for `hpcfed submit`: an admin role is not a job."""
    r = role(framework, name)
    if not r.is_job:
        jobs = ", ".join(n for n, x in table()[framework].items() if x.is_job)
        raise ConfigError(
            f"role {name!r}: the {framework} operator's console runs where you are, not as a job "
            f"(roles to submit: {jobs})"
        )
    return r


def framework_of(role_name: str, default: str = "nvflare") -> str:
    """The one framework that has a role of this name, else `default`."""
    having = [fw for fw, roles in table().items() if role_name in roles]
    return having[0] if len(having) == 1 else default


def local_port_names(argv) -> Tuple[str, ...]:
    return tuple(sorted({m for a in argv for m in _LOCAL_PORT.findall(a)}))


def fill_local_ports(argv, ports: Dict[str, int]) -> Tuple[str, ...]:
    """`argv` with each {local_port:NAME} replaced by the port picked for NAME."""
    return tuple(_LOCAL_PORT.sub(lambda m: str(ports[m.group(1)]), a) for a in argv)


def fill_command(argv, values: Dict[str, object]) -> Tuple[str, ...]:
    """`argv` with the plan-time placeholders ({server_name}, ...) filled; ConfigError names a
    missing one. {local_port:NAME} stays for the job."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("local_port:"):
            return m.group(0)
        if values.get(key) in (None, ""):
            raise ConfigError(f"the role's command needs {key}, which nothing provided")
        return str(values[key])

    return tuple(re.sub(r"\{([a-z_]+(?::[a-z0-9_-]+)?)\}", sub, a) for a in argv)
