"""A submit request, checked and frozen into what would be submitted: SubmitRequest -> prepare().

Both faces of hpcfed use this: the CLI (`hpcfed submit`) turns its flags into a SubmitRequest,
the Python API (hpcfed.Site.submit) its keyword arguments. prepare() does everything that can
fail before anything is submitted: the site profile, the role, the deployment name and id, the
local paths, the kit (its server address and GPU capacity), the plan and its sbatch script.
Errors are the same HpcfedError types and one-line messages for both faces; they name the CLI
flag (`--kit`, `--name`), which is also the keyword argument's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

from hpcfed.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from hpcfed.frameworks import Role
    from hpcfed.plan import Plan
    from hpcfed.profiles.loader import LoadedSite
    from hpcfed.state import Deployment, DeploymentStore

DRY_RUN_ID = "dry-run"


@dataclass(frozen=True)
class SubmitRequest:
    """What the user asked for; None means the site's or role's default."""

    role: str
    site: str
    framework: Optional[str] = None  # default: the framework that has the role, else nvflare
    name: Optional[str] = None  # default: SITE-ROLE
    gpus: Optional[int] = None
    gpu_type: Optional[str] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    kit: Optional[str] = None
    image: Optional[str] = None
    command: Optional[str] = None
    tunnel_config: Optional[str] = None
    forward_local: Tuple[str, ...] = ()
    forward_remote: Tuple[str, ...] = ()
    server_ip: Optional[str] = None  # the server's tunnel address: forwards follow from it
    inputs: Tuple[str, ...] = ()  # NAME=FILE: files the role reads, copied at submit
    dry_run: bool = False


@dataclass(frozen=True)
class Prepared:
    """A checked request: the immutable plan and the sbatch script rendered from it."""

    plan: Plan
    script: str
    dry_run: bool


def prepare(
    request: SubmitRequest,
    *,
    site: Optional[LoadedSite] = None,
    store: Optional[DeploymentStore] = None,
) -> Prepared:
    """Check `request` against the site (loaded here unless given) and freeze it into a plan.

    Raises ConfigError/NotFound/KitError with the one-line message the CLI prints; nothing is
    submitted or recorded.
    """
    from hpcfed import deploy, frameworks
    from hpcfed.names import check_name
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site
    from hpcfed.render import render
    from hpcfed.state import DeploymentStore

    loaded = site if site is not None else load_site(request.site)
    the_role = frameworks.job_role(
        request.framework or frameworks.framework_of(request.role), request.role
    )
    name = check_name("--name", request.name or f"{loaded.name}-{request.role}")
    store = store if store is not None else DeploymentStore()
    existing = None if request.dry_run else store.get(name)
    if existing is not None and existing.site != loaded.name:
        raise ConfigError(f"--name {name}: already a deployment at site {existing.site}")
    dep_id = (
        existing.deployment_id
        if existing
        else (DRY_RUN_ID if request.dry_run else deploy.new_deployment_id())
    )
    kit, image, tunnel_config = request.kit, request.image, request.tunnel_config
    if loaded.profile.scheduler.connect == "local":
        for flag, path in (("--kit", kit), ("--image", image), ("--tunnel-config", tunnel_config)):
            if path and not os.path.exists(os.path.expanduser(path)):
                raise NotFound(f"{flag} {path}: no such file or directory")
    from hpcfed.frameworks import inputs

    input_files, input_binds = inputs.resolve(
        the_role,
        request.inputs,
        data_on_this_machine=loaded.profile.scheduler.connect == "local",
        own_command=request.command is not None,
    )
    kit, server_address, capacity = _resolve_kit(
        kit, loaded.name, the_role, request.command, loaded
    )
    plan = build_plan(
        site=loaded,
        role=the_role,
        name=name,
        deployment_id=dep_id,
        user=deploy.plan_user(loaded),
        gpus=request.gpus,
        gpu_type=request.gpu_type,
        time=request.time,
        partition=request.partition,
        kit=_abs(kit, loaded),
        image=_abs(image, loaded),
        command=request.command,
        tunnel_config=_abs(tunnel_config, loaded),
        local_forwards=tuple(request.forward_local),
        remote_forwards=tuple(request.forward_remote),
        server_address=server_address,
        server_ip=request.server_ip,
        inputs=input_files,
        input_binds=input_binds,
    )
    if plan.kit and capacity is not None:
        from hpcfed.kit.workspace import check_gpu_capacity

        check_gpu_capacity(capacity, plan.resources.gpus, where=f"the kit {plan.kit}")
    return Prepared(plan=plan, script=render(plan), dry_run=request.dry_run)


def submit(
    prepared: Prepared,
    *,
    store: Optional[DeploymentStore] = None,
    progress: Callable[[str], None] = lambda m: None,
) -> Tuple[Deployment, str]:
    """Submit a prepared request and record it: (deployment record, job id)."""
    from hpcfed import deploy
    from hpcfed.state import DeploymentStore

    if prepared.dry_run:
        raise ConfigError("--dry-run: a dry run is never submitted")
    store = store if store is not None else DeploymentStore()
    return deploy.submit_plan(prepared.plan, prepared.script, store, progress=progress)


def _resolve_kit(
    kit: Optional[str], site: str, role: Role, command: Optional[str], loaded: LoadedSite
) -> Tuple[Optional[str], Optional[Tuple[Any, Any]], Optional[int]]:
    """(kit dir, (server host, port), declared GPUs): --kit, else the kit installed for the site.

    The kit's server address decides what the tunnel and the container's /etc/hosts provide; its
    GPU capacity is checked at submit, since NVFlare refuses a mismatch only at start-up and then
    exits 0. A kit on the cluster only (submit over SSH) is used as given, unread.
    """
    from pathlib import Path

    if command is not None or not role.needs_kit:
        return kit, None, None
    if role.credentials in ("fedbiomed-node", "fedbiomed-researcher"):
        from hpcfed.kit.fedbiomed import resolve_component

        return resolve_component(kit, site, role, local=loaded.profile.scheduler.connect == "local")
    if role.credentials != "nvflare-kit":
        from hpcfed.kit.flower import resolve_credentials

        return resolve_credentials(
            kit, site, role, local=loaded.profile.scheduler.connect == "local"
        )
    if kit is None:
        from hpcfed.kit.store import find_kit

        found = find_kit(site, role.name)
        if found is None:
            raise NotFound(
                f"--kit: no {role.framework} {role.name} kit installed for site {site}; pull it with "
                f"`hpcfed kit pull --role {role.name} --site NAME --as {site}` or give --kit DIR"
            )
        return found.path, (found.server_host, found.server_port), found.gpu_capacity
    local = os.path.expanduser(kit)
    if loaded.profile.scheduler.connect != "local" or not os.path.isdir(local):
        return kit, None, None
    from hpcfed.kit.checks import gpu_capacity, server_address

    try:
        host, port = server_address(Path(local), role.name)
        return kit, (host, port) if host else None, gpu_capacity(Path(local))
    except Exception:  # not an NVFlare kit layout: the job's own kit checks will say why
        return kit, None, None


def _abs(path: Optional[str], loaded: LoadedSite) -> Optional[str]:
    """Local paths become absolute (the job runs elsewhere); remote ones are taken as given."""
    if path and loaded.profile.scheduler.connect == "local":
        return os.path.abspath(os.path.expanduser(path))
    return path
