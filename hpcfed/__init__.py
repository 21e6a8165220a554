"""hpcfed: federated-learning roles as Apptainer containers in Slurm GPU jobs.

The Python API (hpcfed.api; docs/api.md) is reachable from here, imported on first use so that
`import hpcfed` (and every CLI command) stays cheap:

    site = hpcfed.Site("local")
    dep = site.submit("client", gpus=2, kit="~/kits/site-1")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import version as _version

    __version__ = _version("hpcfed")
except Exception:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from hpcfed.api import Deployment, Site, Status, deployment, deployments, rejoin
    from hpcfed.errors import HpcfedError
    from hpcfed.submission import SubmitRequest, prepare

_API = {
    "Site": "hpcfed.api",
    "Deployment": "hpcfed.api",
    "Status": "hpcfed.api",
    "deployment": "hpcfed.api",
    "deployments": "hpcfed.api",
    "rejoin": "hpcfed.api",
    "HpcfedError": "hpcfed.errors",
    "SubmitRequest": "hpcfed.submission",
    "prepare": "hpcfed.submission",
}

__all__ = [
    "__version__",
    "Site",
    "Deployment",
    "Status",
    "deployment",
    "deployments",
    "rejoin",
    "HpcfedError",
    "SubmitRequest",
    "prepare",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'hpcfed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
