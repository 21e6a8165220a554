"""Helpers shared by the tests: run commands (optionally as another user) and hpcfed itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

# Tests run under the venv's interpreter: `python -m hpcfed` is the installed package.
# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
IN_CI = os.environ.get("CI") == "true"
XDG_VARS = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME")

# The running test's own directory (set by the autouse fixture in conftest.py; outside a test,
# e.g. in module fixtures, the session's): every hpcfed run, as root or as another user, keeps
# its config, data and state there, so nothing an earlier run (or another test) left in a home
# directory can change the outcome.
TEST_DIR: Optional[str] = None


def user_xdg(user: str) -> dict:
    """XDG_* directories of `user` for the running test, created 0700 and owned by that user."""
    import pwd

    if TEST_DIR is None:
        return {}
    pw = pwd.getpwnam(user)
    base = os.path.join(TEST_DIR, "users", user)
    out = {}
    for var in XDG_VARS:
        path = os.path.join(base, var.split("_")[1].lower())
        os.makedirs(path, mode=0o700, exist_ok=True)
        out[var] = path
    for folder in [base] + list(out.values()):
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        os.chmod(folder, 0o700)
    return out


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
        own = user_xdg(user)
        for var in XDG_VARS:
            if not (env and var in env):
                full_env.pop(var, None)
                if var in own:
                    full_env[var] = own[var]
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


def user_env(user: str) -> dict:
    """Environment entries for a process of `user`: its home and this test's XDG directories."""
    import pwd

    pw = pwd.getpwnam(user)
    return dict(HOME=pw.pw_dir, USER=user, LOGNAME=user, **user_xdg(user))


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


def need_module(name: str, reason: str):
    """Import a module a test file needs at import time: skip the file outside CI, fail in CI."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            raise RuntimeError(f"required in CI: {reason}") from None
        pytest.skip(reason, allow_module_level=True)


@contextlib.contextmanager
def slurm_wrapper(command: str, body: str) -> Iterator[str]:
    """A PATH (for the cluster user too) whose `command` (sbatch, sacct, ...) is the shell script
    `body` around the real one, named $REAL in it: a slow or crashing Slurm command on the real
    cluster."""
    d = Path(tempfile.mkdtemp(prefix=f"hpcfed-{command}bin-"))
    try:
        d.chmod(0o755)  # the cluster user must reach it
        script = d / command
        script.write_text(f"#!/bin/sh\nREAL={shutil.which(command)}\n{body}\n")
        script.chmod(0o755)
        yield f"{d}:{os.environ['PATH']}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sbatch_wrapper(body: str):
    """slurm_wrapper for sbatch (a slow or crashing submission)."""
    return slurm_wrapper("sbatch", body)
