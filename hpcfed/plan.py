"""The immutable plan of one deployment: everything submit renders and the in-job supervisor runs.

build_plan() is pure: the same profile, role and flags always give the same plan (no clock, no
I/O), so `--dry-run` shows exactly what would be submitted and golden files can pin it. The plan
is serialised to JSON inside the sbatch script and read back by `hpcfed job run`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from hpcfed.container.apptainer import bind_path
from hpcfed.errors import ConfigError
from hpcfed.frameworks import LOCAL_BIND, Role, credentials_name, fill_command, local_port_names
from hpcfed.frameworks.inputs import InputFile
from hpcfed.model import Model
from hpcfed.names import check_name
from hpcfed.profiles.loader import LoadedSite
from hpcfed.profiles.schema import Preemption as Preemption  # re-exported: the plan's sections
from hpcfed.profiles.schema import PreflightOptions, SchedulerSettings, one_word
from hpcfed.profiles.schema import Rejoin as Rejoin
from hpcfed.profiles.units import human_duration, parse_duration
from hpcfed.scheduler.target import SchedulerTarget as SchedulerTarget  # re-exported
from hpcfed.scheduler.target import SshTarget as SshTarget
from hpcfed.tunnel import forwards
from hpcfed.tunnel.forwards import LocalForward, RemoteForward

PLAN_VERSION = 1
JOB_NAME_PREFIX = "hpcfed-"
COMMENT_PREFIX = "hpcfed:"


class Resources(Model):
    gpus: int
    gpu_type: Optional[str]
    gpu_option: Optional[str]  # the sbatch option in the site's dialect, e.g. --gres=gpu:a40:2
    cpus: int
    memory_mb: int
    time_seconds: int
    partition: Optional[str]
    account: Optional[str]
    qos: Optional[str]
    constraint: Optional[str]
    reservation: Optional[str]


class Container(Model):
    # apptainer.binary, .gpu_flag and .binds of the profile (their defaults are the schema's)
    apptainer: str
    gpu_flag: Optional[str]
    binds: Tuple[str, ...]


class Tunnel(Model):
    config: str
    local_forwards: Tuple[str, ...] = ()  # [bind:]port=ip:port
    remote_forwards: Tuple[str, ...] = ()  # port=host:port
    ready_timeout: int = 60
    # name -> address the role's /etc/hosts must map (the federation's server name to where the
    # tunnel delivers it): kit certificates fix the name, so the address is what must move.
    hosts: Tuple[Tuple[str, str], ...] = ()
    # A server whose kit port is served by the tunnel (-R KITPORT=host:PORT) listens on PORT:
    # on a shared node the kit's port may be taken (NVFlare binds it on every address).
    listen_port: Optional[int] = None


class _PreflightSwitch(Model):
    enabled: bool  # the job checks its GPUs before the role starts (it has GPUs)


# Listed in this order, the switch's field comes first, as plans have always stored it.
class Preflight(PreflightOptions, _PreflightSwitch):
    """Whether the job runs the GPU preflight check, and the profile's options for it."""


class Plan(Model):
    version: int = PLAN_VERSION
    name: str
    deployment_id: str
    role: str
    framework: str
    site: str
    scheduler: SchedulerTarget
    resources: Resources
    job_name: str
    comment: str  # marker proving a job belongs to this deployment
    workdir: str  # the deployment's directory; relative paths are under the cluster home
    log_pattern: str  # sbatch --output, relative to workdir
    setup: Tuple[str, ...]
    extra_directives: Tuple[str, ...]
    command: Tuple[str, ...]  # the role's entry, run in its workspace
    stop_command: Optional[Tuple[str, ...]]
    env: Dict[str, str] = {}  # the role's own variables (inside its container)
    # Per-job ports the job picks free on its node ({local_port:NAME} in the command).
    local_ports: Tuple[str, ...] = ()
    kit: Optional[str]
    image: Optional[str]
    # Files given with --input, copied into workdir at submit (hpcfed.frameworks.inputs).
    inputs: Tuple[InputFile, ...] = ()
    container: Container
    tunnel: Optional[Tunnel]
    preflight: Preflight
    preemption: Preemption
    rejoin: Rejoin = Rejoin()  # plans written before rejoin existed: the schema's defaults
    hpcfed_command: str
    template: str

    def to_json(self) -> str:
        # Fields added for frameworks other than NVFlare are left out while empty, so an NVFlare
        # plan reads exactly as before (what queued jobs and `rejoin` compare against).
        skip = {f for f in ("env", "local_ports", "inputs") if not getattr(self, f)}
        return self.model_dump_json(indent=2, exclude=skip)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    def log_path(self, job_id: str) -> str:
        return f"{self.workdir.rstrip('/')}/{self.log_pattern.replace('%j', str(job_id))}"

    def summary(self) -> str:
        r = self.resources
        gpu = f"{r.gpus}x{r.gpu_type or 'gpu'}" if r.gpus else "no GPU"
        return (
            f"{self.framework} {self.role} '{self.name}' on {self.site}: {gpu}, {r.cpus} CPU, "
            f"{r.memory_mb} MB, {human_duration(r.time_seconds)}, partition {r.partition or '(default)'}"
        )


def gpu_option(dialect: str, gpus: int, gpu_type: Optional[str]) -> Optional[str]:
    """The GPU request in the site's dialect (Slurm has three; sites accept different ones)."""
    if gpus <= 0:
        return None
    typed = f"{gpu_type}:{gpus}" if gpu_type else str(gpus)
    if dialect == "gres":
        return f"--gres=gpu:{typed}"
    if dialect == "gpus":
        return f"--gpus={typed}"
    if dialect == "gpus-per-node":
        return f"--gpus-per-node={typed}"
    raise ConfigError(f"gpus.dialect {dialect!r}: unknown (gres, gpus, gpus-per-node)")


def parse_forwards(
    local_forwards: Sequence[str], remote_forwards: Sequence[str]
) -> Tuple[List[LocalForward], List[RemoteForward]]:
    """-L/-R specs parsed now, by the parser `hpcfed tunnel up` uses in the job (ConfigError)."""
    local = [forwards.parse_local(spec) for spec in local_forwards]
    remote = [forwards.parse_remote(spec) for spec in remote_forwards]
    forwards.check_unique(local, remote)
    return local, remote


def tunnel_hosts(
    side: str,
    server_address: Optional[Tuple[str, int]],
    local_forwards: Sequence[LocalForward],
    remote_forwards: Sequence[RemoteForward],
) -> Tuple[Tuple[str, str], ...]:
    """Where the federation's server name must resolve inside the role's container.

    `side` is the role's (hpcfed.frameworks): a client or admin reaches the server through its
    local forward of the server's port, so the name maps to that forward's bind address; the
    server listens where its own name resolves, so it maps to the host its remote forward
    delivers to. No server address (or an IP literal): nothing.
    """
    if not server_address or not server_address[0]:
        return ()
    name, port = server_address
    if re.match(r"[0-9.]+\Z", name) or ":" in name:
        return ()
    if side == "server":
        for r in remote_forwards:
            if r.port == port:
                return ((name, r.host),)
        return ()
    for f in local_forwards:
        if f.port == port:
            return ((name, f.bind),)
    return ()


def server_listen_port(
    side: str,
    server_address: Optional[Tuple[str, int]],
    remote_forwards: Sequence[RemoteForward],
) -> Optional[int]:
    """The port a server role must listen on when its remote forward moves the kit's port."""
    if side != "server" or not server_address or not server_address[1]:
        return None
    for r in remote_forwards:
        if r.port == server_address[1] and r.host_port != server_address[1]:
            return r.host_port
    return None


def role_command(
    role: Role, server_address: Optional[Tuple[str, int]], listen_port: Optional[int]
) -> Tuple[str, ...]:
    """The role's command with the federation's address filled in (hpcfed.frameworks)."""
    name, port = server_address or (None, role.federation_port)
    return fill_command(
        role.command,
        {"server_name": name, "server_port": port, "listen_port": listen_port or port},
    )


def _expand_workdir(workdir: str, user: str) -> str:
    """`~/x` -> `x` (jobs are submitted from the home directory), $USER/{user} -> the user."""
    w = workdir.replace("${USER}", user).replace("$USER", user).replace("{user}", user)
    if w == "~":
        return "."
    if w.startswith("~/"):
        return w[2:] or "."
    if "$" in w or w.startswith("~"):
        raise ConfigError(f"workdir {workdir!r}: only ~/ and $USER may be used in it")
    return w


class GpuRequest(NamedTuple):
    gpus: int
    gpu_type: Optional[str]  # None without GPUs


def resolve_gpus(
    site: LoadedSite, role: Role, gpus: Optional[int], gpu_type: Optional[str]
) -> GpuRequest:
    """How many GPUs of which type: the flags checked against the site, else its defaults."""
    g = site.profile.gpus
    n_gpus = role.default_gpus if gpus is None else gpus
    if n_gpus < 0:
        raise ConfigError(f"--gpus {n_gpus}: must be 0 or more")
    if n_gpus > g.max_per_node:
        raise ConfigError(
            f"--gpus {n_gpus}: above the maximum of {g.max_per_node} per node of site "
            f"{site.name} (gpus.max_per_node in {site.source_of('gpus.max_per_node')})"
        )
    if gpu_type is not None:
        if not g.types:
            raise ConfigError(
                f"--gpu-type {gpu_type}: site {site.name} lists no GPU types "
                f"(gpus.types in {site.source_of('gpus.types')})"
            )
        if gpu_type not in g.types:
            raise ConfigError(
                f"--gpu-type {gpu_type}: unknown GPU type for site {site.name} "
                f"(known: {', '.join(g.types)}; gpus.types in {site.source_of('gpus.types')})"
            )
    if n_gpus == 0:
        return GpuRequest(0, None)
    return GpuRequest(n_gpus, gpu_type if gpu_type is not None else g.default_type)


def resolve_time(site: LoadedSite, time: Optional[str]) -> int:
    """The job's time limit in seconds: --time, else the site's default; never above its max."""
    t = site.profile.time
    if time is None:
        seconds = t.default
        time_src = f"time.default in {site.source_of('time.default')}"
    else:
        try:
            seconds = parse_duration(time)
        except ValueError as exc:
            raise ConfigError(f"--time {time}: {exc}") from None
        time_src = f"--time {time}"
    if t.max is not None and seconds > t.max:
        raise ConfigError(
            f"{time_src}: {human_duration(seconds)} is above the maximum "
            f"{human_duration(t.max)} of site {site.name} (time.max in {site.source_of('time.max')})"
        )
    return seconds


def resolve_partition(site: LoadedSite, role: Role, partition: Optional[str]) -> Optional[str]:
    """--partition (or a profile alias it names), else the profile's for the role, side or default.

    A profile's partitions name roles or sides (server/client), so they apply to every framework.
    """
    parts = site.profile.partitions
    if not partition:
        return parts.get(role.name) or parts.get(role.side) or parts.get("default")
    part = parts.get(partition, partition)
    try:
        one_word(part)
    except ValueError as exc:
        raise ConfigError(f"--partition {exc}") from None
    return part


class CpusMemory(NamedTuple):
    cpus: int
    memory_mb: int


def resolve_cpus_memory(site: LoadedSite, n_gpus: int) -> CpusMemory:
    """The profile's CPUs and memory, raised to its per-GPU amounts for a job with GPUs."""
    p = site.profile
    return CpusMemory(
        max(p.cpus, n_gpus * (p.gpus.cpus_per_gpu or 0)),
        max(p.memory, n_gpus * (p.gpus.mem_per_gpu or 0)),
    )


def resolve_own_command(
    role: Role, command: Optional[str], kit: Optional[str]
) -> Optional[Tuple[str, ...]]:
    """--command as the entry (None: the role's own, which then needs its kit)."""
    if command is not None:
        if not command.strip():
            raise ConfigError("--command: empty")
        return ("sh", "-c", command)
    if role.needs_kit and not kit:
        raise ConfigError(
            f"--kit: the {role.framework} {role.name} needs its {credentials_name(role)} "
            "directory (or --command CMD to run something else)"
        )
    return None


def job_loopback(user: str, name: str) -> str:
    """The loopback address of `user`'s deployment `name`, 127.A.B.1 (A: 1-254).

    A client role's local forwards listen there, not on 127.0.0.1: two jobs on one compute node
    (two sites, two nodes of one site, two users) do not collide on the federation's port, the
    address stays the same when the job is requeued elsewhere, and --dry-run shows it.
    """
    digest = hashlib.sha256(f"{user}/{name}".encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}.1"


def derive_forwards(
    role: Role,
    server_address: Optional[Tuple[str, int]],
    server_ip: Optional[str],
    bind: str,
    own_command: bool,
) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(-L specs, -R specs) that follow from the ports the role serves or dials.

    A server side role: each port it serves, reached at its tunnel address, is delivered to the
    same port on 127.0.0.1. A client side role: each port it dials listens on the job's loopback
    address `bind` and is carried to `server_ip` (the server's tunnel address). The first port's number
    is the kit's (server_address), the others the framework's defaults.
    """
    ports = role.serves if role.side == "server" else role.dials
    numbers = [n for _, n in ports]
    if numbers and server_address and server_address[1]:
        numbers[0] = server_address[1]
    if role.side == "server":
        if server_ip:
            raise ConfigError(
                f"--server-ip {server_ip}: the {role.framework} {role.name} is the server; it is "
                "reached at its own tunnel address (--server-ip is for the roles that dial it)"
            )
        return (), tuple(spec for port in numbers for spec in role.forwards("", port)[1])
    if not server_ip:
        if own_command or not numbers:
            return (), ()
        raise ConfigError(
            f"--server-ip: the {role.framework} {role.name} dials the server's port "
            f"{numbers[0]} through the tunnel; give the server's tunnel address "
            "(`hpcfed hub list` on the hub) or the forwards with -L"
        )
    ip = forwards.parse_tunnel_ip(server_ip)
    local = [spec for port in numbers for spec in role.forwards(ip, port, bind=bind)[0]]
    return tuple(local), ()


def resolve_tunnel(
    role: Role,
    tunnel_config: Optional[str],
    local_forwards: Tuple[str, ...],
    remote_forwards: Tuple[str, ...],
    server_address: Optional[Tuple[str, int]],
    server_ip: Optional[str] = None,
    bind: str = LOCAL_BIND,
    own_command: bool = False,
) -> Optional[Tunnel]:
    """The job's tunnel (forwards checked now, by the parser the job uses), or None.

    Without -L/-R the forwards follow from the role's ports (derive_forwards); given ones
    replace them.
    """
    if not tunnel_config:
        if local_forwards or remote_forwards or server_ip:
            flags = "--server-ip" if server_ip else "--forward-local/--forward-remote"
            raise ConfigError(f"{flags}: need --tunnel-config")
        return None
    if local_forwards or remote_forwards:
        if server_ip:
            raise ConfigError(
                f"--server-ip {server_ip}: give either the server's address or -L/-R, not both"
            )
    else:
        local_forwards, remote_forwards = derive_forwards(
            role, server_address, server_ip, bind, own_command
        )
    local, remote = parse_forwards(local_forwards, remote_forwards)
    return Tunnel(
        config=tunnel_config,
        local_forwards=tuple(local_forwards),
        remote_forwards=tuple(remote_forwards),
        hosts=tunnel_hosts(role.side, server_address, local, remote),
        listen_port=server_listen_port(role.side, server_address, remote),
    )


def scheduler_target(s: SchedulerSettings) -> SchedulerTarget:
    """Where the site's jobs go: the profile's scheduler section as a plan records it."""
    return SchedulerTarget(**s.model_dump())


def build_plan(
    *,
    site: LoadedSite,
    role: Role,
    name: str,
    deployment_id: str,
    user: str,
    gpus: Optional[int] = None,
    gpu_type: Optional[str] = None,
    time: Optional[str] = None,
    partition: Optional[str] = None,
    kit: Optional[str] = None,
    image: Optional[str] = None,
    command: Optional[str] = None,
    tunnel_config: Optional[str] = None,
    local_forwards: Tuple[str, ...] = (),
    remote_forwards: Tuple[str, ...] = (),
    server_address: Optional[Tuple[str, int]] = None,
    server_ip: Optional[str] = None,
    inputs: Tuple[InputFile, ...] = (),
    input_binds: Tuple[str, ...] = (),
) -> Plan:
    """Check the request against the site and freeze it into a Plan (ConfigError if impossible)."""
    p = site.profile
    check_name("--name", name)
    check_name("site", site.name)

    gpu = resolve_gpus(site, role, gpus, gpu_type)
    seconds = resolve_time(site, time)
    part = resolve_partition(site, role, partition)
    cpus, memory = resolve_cpus_memory(site, gpu.gpus)
    own_command = resolve_own_command(role, command, kit)
    tunnel = resolve_tunnel(
        role,
        tunnel_config,
        local_forwards,
        remote_forwards,
        server_address,
        server_ip=server_ip,
        bind=job_loopback(user, name),
        own_command=own_command is not None,
    )
    entry = own_command or role_command(
        role, server_address, tunnel.listen_port if tunnel else None
    )
    if image and kit:
        bind_path(kit, "--kit")  # mounted into the container: apptainer splits on ',' and ':'

    return Plan(
        name=name,
        deployment_id=deployment_id,
        role=role.name,
        framework=role.framework,
        site=site.name,
        scheduler=scheduler_target(p.scheduler),
        resources=Resources(
            gpus=gpu.gpus,
            gpu_type=gpu.gpu_type,
            gpu_option=gpu_option(p.gpus.dialect, gpu.gpus, gpu.gpu_type),
            cpus=cpus,
            memory_mb=memory,
            time_seconds=seconds,
            partition=part,
            account=p.account,
            qos=p.qos,
            constraint=p.constraint,
            reservation=p.reservation,
        ),
        job_name=f"{JOB_NAME_PREFIX}{name}",
        comment=f"{COMMENT_PREFIX}{name}:{deployment_id}",
        workdir=f"{_expand_workdir(p.workdir, user).rstrip('/')}/{name}",
        log_pattern="job-%j.log",
        setup=tuple(p.setup),
        extra_directives=tuple(p.extra_directives),
        command=entry,
        stop_command=role.stop_command,
        env=dict(role.env),
        local_ports=local_port_names(entry),
        kit=kit,
        image=image,
        inputs=tuple(inputs),
        container=Container(
            apptainer=p.apptainer.binary,
            gpu_flag=p.apptainer.gpu_flag,
            binds=tuple(p.apptainer.binds) + tuple(input_binds),
        ),
        tunnel=tunnel,
        preflight=Preflight(enabled=gpu.gpus > 0, **p.preflight.model_dump()),
        # the profile's sections, in the plan's own (unparsing) models
        preemption=Preemption(**p.preemption.model_dump()),
        rejoin=Rejoin(**p.rejoin.model_dump()),
        hpcfed_command=p.hpcfed_command,
        template=role.template,
    )
