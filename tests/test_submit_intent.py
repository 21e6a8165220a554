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
