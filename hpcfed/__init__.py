"""hpcfed: federated-learning roles as Apptainer containers in Slurm GPU jobs.

The Python API (hpcfed.api; docs/api.md) is reachable from here, imported on first use so that
`import hpcfed` (and every CLI command) stays cheap:

    site = hpcfed.Site("local")
    dep = site.submit("client", gpus=2, kit="~/kits/site-1")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str
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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcfed")
    except Exception:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    # importlib.metadata alone costs more than the rest of a submit's imports: asked for only
    # by `hpcfed --version` and hpcfed.__version__, so read only then.
    if name == "__version__":
        return _version()
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'hpcfed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
