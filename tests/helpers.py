"""Helpers shared by the tests: run commands (optionally as another user) and hpcfed itself."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Optional, Sequence

# Tests run under the venv's interpreter: `python -m hpcfed` is the installed package.
# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
IN_CI = os.environ.get("CI") == "true"


def run(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    user: Optional[str] = None,
    check: bool = False,
    timeout: float = 120,
    input: Optional[str] = None,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run argv, with `env` added to the current environment, as `user` when given (via runuser)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    argv = list(argv)
    if user is not None:
        # runuser -u keeps the environment we pass (HOME etc. are set below to the user's).
        import pwd

        pw = pwd.getpwnam(user)
        full_env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
            if not (env and var in env):
                full_env.pop(var, None)
        argv = ["runuser", "-u", user, "--"] + argv
    return subprocess.run(
        argv,
        env=full_env,
        check=check,
        timeout=timeout,
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
    )


def hpcfed(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed hpcfed CLI with args; same keywords as run()."""
    return run(HPCFED + list(args), **kwargs)


def need(condition: bool, reason: str) -> None:
    """Skip when a real part is missing here; in CI (CI=true) a missing part fails the run."""
    import pytest

    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)
