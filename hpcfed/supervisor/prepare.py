"""What comes before the role: GPU preflight, the tunnel, the role's workspace.

Each part comes from another package (hpcfed.gpu, hpcfed.tunnel, hpcfed.kit); an import is
guarded so a part that is not installed is skipped with a log line - unless the plan asks for
it, then the job fails with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from hpcfed.errors import KitError
from hpcfed.frameworks import role as role_of
from hpcfed.plan import Plan
from hpcfed.supervisor.job_environment import JobPaths
from hpcfed.supervisor.records import log
from hpcfed.tunnel import job as tunnel_job


def preflight(plan: Plan) -> Optional[dict]:
    """The GPU preflight's report; raises GpuPreflightFailed. None: not asked for or absent."""
    pf = plan.preflight
    if not pf.enabled:
        return None
    try:
        from hpcfed.gpu.preflight import run_preflight
    except ImportError:
        log("GPU preflight: hpcfed.gpu.preflight not installed; skipped")
        return None
    report = run_preflight(pf.min_memory_mib, pf.allow_without_nvml)
    log(f"GPU preflight passed: {json.dumps(report, sort_keys=True, default=str)}")
    return report


def start_tunnel(plan: Plan, paths: JobPaths) -> Optional[tunnel_job.TunnelChild]:
    """Start the tunnel (hpcfed.tunnel.job holds the how; the plan holds the forwards). The
    caller owns the child from here on, so it is stopped even if it never comes up."""
    t = plan.tunnel
    if t is None:
        return None
    ready = str(paths.tunnel_ready)
    argv = tunnel_job.tunnel_argv(
        t.config, t.local_forwards, t.remote_forwards, ready, t.ready_timeout
    )
    log(f"starting tunnel: {' '.join(argv[1:])}")
    return tunnel_job.TunnelChild.start(argv, ready)


def wait_tunnel(child: tunnel_job.TunnelChild, plan: Plan, stopping: Callable[[], bool]) -> None:
    """Until the tunnel's first handshake; raises TunnelError with the tunnel's own reason."""
    assert plan.tunnel is not None
    child.wait_ready(plan.tunnel.ready_timeout, stopping=stopping)
    if not stopping():
        log("tunnel is up")


def workspace(plan: Plan, workdir: Path, preflight_report: Optional[dict]) -> Path:
    """Where the role runs. Only an NVFlare startup kit becomes a workspace of its own; other
    credentials are mounted read-only as they are, and the role works in the deployment's
    directory."""
    if not plan.kit or role_of(plan.framework, plan.role).credentials != "nvflare-kit":
        return workdir
    try:
        from hpcfed.kit.workspace import prepare_workspace
    except ImportError:
        raise KitError("the plan has a kit but hpcfed.kit.workspace is not installed") from None
    no_driver = bool(preflight_report and preflight_report.get("skipped"))
    if no_driver:
        log("GPUs without a driver (allowed by the site profile): NVFlare will not count host GPUs")
    ws = prepare_workspace(
        plan.kit,
        str(workdir),
        plan.role,
        plan.resources.gpus,
        gpus_without_driver=no_driver,
        listen_port=plan.tunnel.listen_port if plan.tunnel else None,
    )
    log(f"workspace: {ws}")
    return Path(ws)
