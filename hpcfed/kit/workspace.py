"""Turn an installed kit into a writable NVFlare workspace inside the job's workdir.

Called by the in-job supervisor. The kit may be mounted read-only and NVFlare writes into its
workspace (logs, job folders, `local/`), so the workspace is a copy under `workdir`. It is
rebuilt idempotently on every start: a requeued job gets fresh startup files from the kit while
the server's job and snapshot storage (inside the workspace, not /tmp) survive the requeue.

GPU capacity: the dashboard bakes the site's registered `num_of_gpus` into the kit. NVFlare
refuses to start a client that declares more GPUs than the node shows - and exits 0, so the job
looks successful. A kit declaring MORE GPUs than the job has is therefore an error here; fewer
is harmless (NVFlare schedules FL jobs within the declared count, the extra GPUs stay idle) and
allowed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from hpcfed.errors import KitError
from hpcfed.kit.checks import ROLE_FILES, detect_role, gpu_capacity, require_ok, verify_kit
from hpcfed.kit.store import METADATA, make_private

STORAGE = "storage"  # <workspace>/storage/{jobs,snapshot}: the server's state, kept across requeues


def check_gpu_capacity(declared, gpus: int, where: str = "the kit") -> None:
    if declared is not None and declared > gpus:
        raise KitError(
            f"{where} declares {declared} GPU(s) (num_of_gpus in local/resources.json.default) but the job "
            f"has {gpus}: NVFlare would stop at start-up and still exit 0. Submit with --gpus {declared}, "
            f"or have the site re-registered on the dashboard with {gpus} GPU(s) and pull the kit again"
        )


def _move_server_port(config_path: Path, port: int) -> None:
    """Make the server listen on `port` (the certificate names a host, not a port)."""
    config = json.loads(config_path.read_text())
    for server in config.get("servers", []):
        service = server.get("service") or {}
        host, _, old = str(service.get("target", "")).rpartition(":")
        if host:
            service["target"] = f"{host}:{port}"
        if str(server.get("admin_port")) == old:
            server["admin_port"] = port
    config_path.write_text(json.dumps(config, indent=2))


def _resources(kit: Path) -> dict:
    for name in ("resources.json", "resources.json.default"):
        path = kit / "local" / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def _point_storage_inside(resources: dict, storage: Path) -> dict:
    """Server job and snapshot storage default to /tmp/nvflare: move them into the workspace."""
    snapshot = (
        resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    )
    if isinstance(snapshot, dict):
        snapshot["root_dir"] = str(storage / "snapshot")
    for comp in resources.get("components", []):
        if comp.get("id") == "job_manager":
            comp.setdefault("args", {})["uri_root"] = str(storage / "jobs")
    return resources


def _replace_dir(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def prepare_workspace(
    kit_dir: str,
    workdir: str,
    role: str,
    gpus: int,
    gpus_without_driver: bool = False,
    listen_port: Optional[int] = None,
) -> str:
    """Build (or refresh) `<workdir>/nvflare/<role>` from the kit; return the workspace path.

    `gpus_without_driver`: the job's GPUs are real to Slurm but NVML cannot see them (the site
    profile allowed that, e.g. a test cluster's fake GPUs); NVFlare's GPU resource manager is
    then told not to count the host's GPUs, or it stops at start-up (and exits 0).
    `listen_port`: a server listens here instead of its kit's port (the tunnel serves that one).
    """
    kit = Path(kit_dir)
    found = detect_role(kit)
    if found is None:
        raise KitError(
            f"{kit_dir} is not an NVFlare startup kit (no startup/{ROLE_FILES[role][0]})"
        )
    if found != role:
        raise KitError(f"{kit_dir} is a {found} kit, but this job runs the {role} role")
    # checked at pull time too, but a job may start months later: an expired certificate or a
    # swapped key must stop the job here, not make NVFlare fail quietly
    require_ok(verify_kit(kit), f"the kit in {kit_dir}")
    if role == "client":
        check_gpu_capacity(gpu_capacity(kit), gpus, f"the kit in {kit_dir}")

    ws = Path(workdir) / "nvflare" / role
    ws.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace_dir(kit / "startup", ws / "startup")
    if role == "server" and listen_port:
        _move_server_port(ws / "startup" / "fed_server.json", listen_port)
    local = ws / "local"
    local.mkdir(exist_ok=True, mode=0o700)
    if (kit / "local").is_dir():
        for item in (kit / "local").iterdir():
            if item.is_file():
                shutil.copyfile(item, local / item.name)
    (ws / "transfer").mkdir(exist_ok=True, mode=0o700)

    resources = _resources(kit)
    if resources:
        if role == "server":
            storage = ws / STORAGE
            (storage / "jobs").mkdir(parents=True, exist_ok=True)
            (storage / "snapshot").mkdir(parents=True, exist_ok=True)
            _point_storage_inside(resources, storage)
        if gpus_without_driver:
            for comp in resources.get("components", []):
                if comp.get("id") == "resource_manager" and "num_of_gpus" in comp.get("args", {}):
                    comp["args"]["ignore_host"] = True
        tmp = local / ".resources.json.tmp"
        tmp.write_text(json.dumps(resources, indent=2))
        os.replace(tmp, local / "resources.json")
    for name in ("readme.txt", METADATA):
        if (kit / name).is_file():
            shutil.copyfile(kit / name, ws / name)
    make_private(ws / "startup")
    make_private(local)
    os.chmod(ws, 0o700)
    return str(ws)
