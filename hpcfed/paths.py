"""Where hpcfed keeps things: the user's config, data and state, and the bundled data files.

State lives on the (often NFS-shared) home directory so every login node sees the same
deployments; see hpcfed.state for how writes stay safe there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / default


def config_dir() -> Path:
    """User configuration: site profiles in `sites/`."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "hpcfed"


def data_dir() -> Path:
    """User data: startup kits, pinned root CAs, images when the profile names none."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "hpcfed"


def state_dir() -> Path:
    """Deployments, events, locks."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "hpcfed"


def cache_dir() -> Path:
    """What can be rebuilt at any time (compiled sbatch templates)."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "hpcfed"


def user_sites_dir() -> Path:
    return config_dir() / "sites"


# Data files shipped inside the wheel (top-level symlinks in the repository point here).
def bundled_site_profiles_dir() -> Path:
    return PACKAGE_DIR / "site_profiles"


def sbatch_templates_dir() -> Path:
    return PACKAGE_DIR / "sbatch_templates"


def apptainer_defs_dir() -> Path:
    return PACKAGE_DIR / "apptainer"


def private_mkdir(path: Path) -> Path:
    """Create a directory (and parents) readable only by the user: 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def hpcfed_command() -> list:
    """argv that runs this very hpcfed in a child process (tunnel, cron entries).

    The installed console script next to this interpreter first: `python -m hpcfed` would import
    a source tree that happens to be in the working directory instead of the installed package.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "hpcfed")
    if os.path.exists(beside):
        return [beside]
    found = shutil.which("hpcfed")
    if found:
        return [found]
    # -P (Python 3.11+): do not put the working directory first on sys.path.
    return [sys.executable] + (["-P"] if sys.version_info >= (3, 11) else []) + ["-m", "hpcfed"]
