"""hpcfed killed between `sbatch` and writing the deployment record: the job it submitted is not
lost. The intent is recorded before sbatch, and the next command (submit, status, rejoin) adopts
the job carrying the deployment's marker; a retried submit never starts a second job. Against
the real Slurm cluster, as the non-root user; the crash is a real SIGKILL of hpcfed, sent by an
`sbatch` wrapper right after the real sbatch accepted the job."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid

import pytest
from helpers import hpcfed, run, sbatch_wrapper

pytestmark = pytest.mark.slurm


@pytest.fixture()
def user_state(slurm_cluster):
    d = tempfile.mkdtemp(prefix="hpcfed-intent-")
    shutil.chown(d, user=slurm_cluster.user)
    yield {"XDG_STATE_HOME": d}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def crashing_sbatch():
    """A PATH entry whose `sbatch` submits for real, then SIGKILLs hpcfed before it hears back."""
    with sbatch_wrapper('out=$("$REAL" "$@") || exit $?\nkill -KILL $PPID\necho "$out"') as path:
        yield path


def submit(cluster, env, name):
    return hpcfed(
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
        user=cluster.user,
        env=env,
    )


def active_jobs(name):
    out = run(
        [
            "squeue",
            "--noheader",
            f"--name=hpcfed-{name}",
            "--states=PENDING,RUNNING,CONFIGURING",
            "--format=%i",
        ]
    ).stdout
    return sorted(out.split())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("next_command", ["submit", "status", "rejoin"])
def test_a_crash_after_sbatch_leaves_no_untracked_job(
    slurm_cluster, user_state, crashing_sbatch, next_command
):
    name = f"intent-{uuid.uuid4().hex[:6]}"
    crashed = submit(slurm_cluster, dict(user_state, PATH=crashing_sbatch), name)
    assert crashed.returncode != 0  # killed
    jobs = active_jobs(name)
    assert len(jobs) == 1, jobs  # the job was submitted before the crash
    try:
        if next_command == "status":
            proc = hpcfed("status", name, "--json", user=slurm_cluster.user, env=user_state)
            assert proc.returncode == 0, proc.stderr
        elif next_command == "rejoin":
            proc = hpcfed("rejoin", "--json", user=slurm_cluster.user, env=user_state)
            assert proc.returncode == 0, proc.stderr
        # a retried submit (after status/rejoin or straight away) must not start a second job
        proc = submit(slurm_cluster, user_state, name)
        assert proc.returncode == 3 and f"already has job {jobs[0]}" in proc.stderr, proc.stderr
        assert active_jobs(name) == jobs
        proc = hpcfed("status", name, "--json", user=slurm_cluster.user, env=user_state)
        assert proc.returncode == 0, proc.stderr
        dep = json.loads(proc.stdout)["deployments"][0]
        assert dep["job_id"] == jobs[0] and [j["job_id"] for j in dep["jobs"]] == jobs
        assert any(e["event"] == "adopted" for e in dep["events"]), dep["events"]
        proc = hpcfed("cancel", name, user=slurm_cluster.user, env=user_state)
        assert proc.returncode == 0, proc.stderr
        assert active_jobs(name) == []
    finally:
        for job in jobs:
            run(["scancel", job])


@pytest.mark.timeout(180)
def test_status_during_a_slow_first_submit_says_it_is_running_and_settles_nothing(
    slurm_cluster, user_state
):
    """A first submit inside a slow sbatch (intent recorded, lock held, no job yet): status
    from another shell must say the submit is running - not "interrupted" - and must not settle
    it; the submit then records its one job."""
    import os
    import subprocess
    import time
    from pathlib import Path

    from helpers import HPCFED, user_env

    name = f"slow-{uuid.uuid4().hex[:6]}"
    record = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
    with sbatch_wrapper('sleep 8\nexec "$REAL" "$@"') as path:
        env = dict(os.environ, **user_env(slurm_cluster.user))
        env.update(user_state, PATH=path)
        argv = ["submit", "client", "--site", "local", "--gpus", "0", "--name", name]
        first = subprocess.Popen(
            ["runuser", "-u", slurm_cluster.user, "--", *HPCFED, *argv, "--command", "sleep 600"]
            + ["--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not (record.exists() and json.loads(record.read_text()).get("pending")):
                assert first.poll() is None and time.monotonic() < deadline, first.communicate()
                time.sleep(0.2)
            proc = hpcfed("status", name, "--json", user=slurm_cluster.user, env=user_state)
            assert proc.returncode == 0, proc.stderr
            (row,) = json.loads(proc.stdout)["deployments"]
            assert row["reason"] == "another hpcfed is submitting it right now", row
            assert not any(e["event"] == "submit-interrupted" for e in row["events"]), row
        finally:
            out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    job_id = json.loads(out)["job_id"]
    try:
        assert active_jobs(name) == [job_id]
        proc = hpcfed("status", name, "--json", user=slurm_cluster.user, env=user_state)
        (row,) = json.loads(proc.stdout)["deployments"]
        assert [j["job_id"] for j in row["jobs"]] == [job_id], row
    finally:
        run(["scancel", job_id])
