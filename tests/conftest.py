"""Session fixtures for real parts. The Slurm test cluster comes up once per session."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import helpers
import pytest

# The Docker test cluster fixture is defined here, once for the session: imported into each test
# module instead, every module had its own session fixture, so a cluster per module, each
# `up` removing the one before.
from docker_cluster import docker_lab_fixture  # noqa: F401
from helpers import IN_CI, XDG_VARS, hpcfed, need

# ---------------------------------------------------------------- isolation

# One folder per test session, traversable by the cluster user (pytest's own tmp is root-only).
_SESSION_DIR = tempfile.mkdtemp(prefix="hpcfed-test-")
os.chmod(_SESSION_DIR, 0o755)
_SEQUENCE = itertools.count(1)
helpers.TEST_DIR = os.path.join(_SESSION_DIR, "session")
_SKIPPED = pytest.StashKey[int]()
_CONFIG: list = []


@pytest.fixture(autouse=True)
def own_directories(monkeypatch):
    """Every test gets its own XDG config/data/state/cache directories, for root and (through
    helpers.run(user=...)) for every other user: no test sees what an earlier run or an earlier
    test left in a home directory."""
    test_dir = os.path.join(_SESSION_DIR, f"{next(_SEQUENCE):04d}")
    os.makedirs(test_dir, mode=0o755)
    os.chmod(test_dir, 0o755)
    helpers.TEST_DIR = test_dir
    for var in XDG_VARS:
        path = os.path.join(test_dir, "root", var.split("_")[1].lower())
        os.makedirs(path, mode=0o700)
        monkeypatch.setenv(var, path)
    if helpers.HPCFED[0] != "/opt/hpcfed/venv/bin/hpcfed":
        # A venv other than the one the bundled `local` profile names: its jobs run this hpcfed.
        monkeypatch.setenv("HPCFED_SITE__HPCFED_COMMAND", helpers.HPCFED[0])
    yield test_dir
    helpers.TEST_DIR = os.path.join(_SESSION_DIR, "session")


# ---------------------------------------------------------------- skipped tests are counted


def pytest_configure(config):
    _CONFIG.append(config)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.docker_releases("22.05")`: run a test on the Docker test cluster of these
    Slurm releases only. The others are deselected (not skipped), and every test shares the one
    session-wide cluster per release (an indirect parametrisation would start a second one)."""
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("docker_releases")
        params = getattr(item, "callspec", None)
        release = params.params.get("docker_lab") if params else None
        (drop if mark and release not in mark.args else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    if report.skipped and _CONFIG:
        stash = _CONFIG[0].stash
        stash[_SKIPPED] = stash.get(_SKIPPED, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    # CI=true: a skipped test is a missing part, and a missing part fails the run.
    if IN_CI and session.config.stash.get(_SKIPPED, 0) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = config.stash.get(_SKIPPED, 0)
    verdict = " (CI=true: a skipped test fails the run)" if IN_CI and skipped else ""
    terminalreporter.write_line(f"hpcfed: {skipped} test(s) skipped{verdict}")


@dataclass(frozen=True)
class SlurmCluster:
    prefix: str  # where the cluster's config, spool and logs live
    slurm_conf: str
    user: str  # a non-root user with an accounting association
    account: str
    env: dict = field(default_factory=dict)  # add to a command's environment to reach the cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The real local Slurm cluster (`hpcfed testcluster up`), shared by the whole session.

    Outside CI a machine that cannot run it (not root) skips the Slurm tests; in CI it fails.
    """
    need(os.geteuid() == 0, "the Slurm test cluster needs root to start its daemons")
    proc = hpcfed("testcluster", "up", "--json", timeout=900)
    need(proc.returncode == 0, f"hpcfed testcluster up failed: {proc.stderr.strip()[-2000:]}")
    info = json.loads(proc.stdout)
    cluster = SlurmCluster(
        prefix=info["prefix"],
        slurm_conf=info["slurm_conf"],
        user=info["user"],
        account=info["account"],
        env=dict(info["env"]),
    )
    os.environ.update(cluster.env)  # so every Slurm command the tests run finds the cluster
    return cluster
