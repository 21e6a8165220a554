"""Deployment records that cannot be read: one bad record (garbage, a foreign file, one written by
a newer hpcfed) is reported in one line naming its file and skipped; every other deployment is
still shown, rejoined and cancelled. Against the real Slurm cluster, as the non-root user."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, run

from hpcfed.state.store import SCHEMA_VERSION

pytestmark = pytest.mark.slurm


@pytest.fixture()
def user_state(slurm_cluster):
    """An own state directory for the cluster user: only this test's deployments in it."""
    d = tempfile.mkdtemp(prefix="hpcfed-records-")
    shutil.chown(d, user=slurm_cluster.user)
    yield {"XDG_STATE_HOME": d}
    shutil.rmtree(d, ignore_errors=True)


def as_user(cluster, env, *args, timeout=120):
    return hpcfed(*args, user=cluster.user, env=env, timeout=timeout)


def submit_sleeper(cluster, env, name):
    proc = as_user(
        cluster,
        env,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        "sleep 600",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["job_id"]


def write_as(cluster, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    shutil.chown(path, user=cluster.user)
    path.chmod(0o600)


@pytest.mark.timeout(180)
def test_bad_records_are_reported_and_skipped(slurm_cluster, user_state):
    good = f"good-{uuid.uuid4().hex[:6]}"
    job_id = submit_sleeper(slurm_cluster, user_state, good)
    records = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments"
    good_record = json.loads((records / f"{good}.json").read_text())
    assert good_record["schema"] == SCHEMA_VERSION

    garbage = records / "garbage.json"
    write_as(slurm_cluster, garbage, b"\xff\xfe{not json")
    foreign = records / "foreign.json"
    write_as(slurm_cluster, foreign, b"[1, 2, 3]")
    future = records / "future.json"
    newer = dict(good_record, name="future", schema=SCHEMA_VERSION + 1)
    del newer["plan"]  # a newer hpcfed may store it differently
    newer["spec"] = {"anything": True}
    write_as(slurm_cluster, future, json.dumps(newer).encode())
    bad_files = (garbage, foreign, future)

    def one_line_per_bad_file(stderr):
        lines = [line for line in stderr.splitlines() if "skipped" in line]
        assert len(lines) == 3, stderr
        for path in bad_files:
            assert sum(str(path) in line for line in lines) == 1, stderr
        assert "newer hpcfed" in [line for line in lines if str(future) in line][0]
        assert "Traceback" not in stderr

    proc = as_user(slurm_cluster, user_state, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [d["name"] for d in json.loads(proc.stdout)["deployments"]] == [good]
    one_line_per_bad_file(proc.stderr)

    proc = as_user(slurm_cluster, user_state, "rejoin", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [(d["name"], d["action"]) for d in json.loads(proc.stdout)["deployments"]] == [
        (good, "ok")
    ]
    one_line_per_bad_file(proc.stderr)

    # The bad record alone is refused, clearly, and left as it was.
    for cmd in (("status", "future"), ("cancel", "future"), ("logs", "future")):
        proc = as_user(slurm_cluster, user_state, *cmd)
        assert proc.returncode == 3, (cmd, proc.stderr)
        assert proc.stderr.count("\n") == 1 and str(future) in proc.stderr, proc.stderr
        assert "newer hpcfed" in proc.stderr
    proc = as_user(slurm_cluster, user_state, "status", "garbage")
    assert proc.returncode == 3 and str(garbage) in proc.stderr, proc.stderr
    assert json.loads(future.read_text()) == newer

    proc = as_user(slurm_cluster, user_state, "logs", good)
    assert proc.returncode in (0, 8), proc.stderr  # no log yet is fine; no crash

    proc = as_user(slurm_cluster, user_state, "cancel", good)
    assert proc.returncode == 0, proc.stderr
    assert f"cancelled {good}" in proc.stdout
    squeue = run(["squeue", "--noheader", "--jobs", job_id, "--states=PENDING,RUNNING"])
    assert squeue.stdout.strip() == "", squeue.stdout
    assert json.loads((records / f"{good}.json").read_text())["stopped"] is True


def test_records_of_before_the_schema_version_are_migrated(tmp_path):
    """A record written before records carried a version is read as version 0 and migrated."""
    from hpcfed.state import DeploymentStore

    store = DeploymentStore(tmp_path)
    old = {
        "name": "old",
        "deployment_id": "abc",
        "site": "local",
        "role": "client",
        "framework": "nvflare",
        "plan": {"scheduler": {}},
        "jobs": [{"job_id": "7", "submitted_at": "2026-01-01T00:00:00+0000"}],
        "events": [],
        "stopped": False,
        "created_at": "2026-01-01T00:00:00+0000",
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    dep = store.require("old")
    assert dep.job_id == "7" and dep.deployment_id == "abc"
    store.put(dep)
    assert json.loads((tmp_path / "old.json").read_text())["schema"] == SCHEMA_VERSION
