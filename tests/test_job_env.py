"""What the job learns from Slurm (unit tests of JobEnvironment), and what the submitting shell
may and may not change about a job, against the real Slurm cluster.

The shell that runs `hpcfed submit` holds secrets (HPCFED_DASHBOARD_PASSWORD, which the docs tell
users to export; cloud tokens) and variables that steer Slurm's commands (SBATCH_*, SLURM_*,
SQUEUE_*). None of them may reach the job or change what is submitted: the job gets PATH, HOME,
USER and LOGNAME from the shell, the user's login environment on the node (Slurm loads it) and
what Slurm itself sets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, run


@pytest.fixture()
def user_state(slurm_cluster):
    """An own state directory for the cluster user."""
    d = tempfile.mkdtemp(prefix="hpcfed-jobenv-")
    shutil.chown(d, user=slurm_cluster.user)
    yield {"XDG_STATE_HOME": d}
    shutil.rmtree(d, ignore_errors=True)


def wait_done(cluster, env, name, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = hpcfed("status", name, "--json", user=cluster.user, env=env)
        assert proc.returncode == 0, proc.stderr
        dep = json.loads(proc.stdout)["deployments"][0]
        if dep["job_state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return dep
        time.sleep(0.5)
    pytest.fail(f"{name} did not finish")


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_submitting_shell_secrets_and_slurm_variables_do_not_reach_the_job(
    slurm_cluster, user_state
):
    name = f"jobenv-{uuid.uuid4().hex[:6]}"
    cmd = (
        'echo "PW=[$HPCFED_DASHBOARD_PASSWORD] TOKEN=[$AWS_SECRET_ACCESS_KEY] '
        'FOO=[$SLURM_FOO] LC=[$LC_ALL]"; '
        'echo "HOME=[$HOME] USER=[$USER] JOB=[$SLURM_JOB_ID]"; '
        'echo "PATH=[$PATH]"'
    )
    shell = dict(
        user_state,
        HPCFED_DASHBOARD_PASSWORD="x-secret-pw",
        AWS_SECRET_ACCESS_KEY="x-secret-token",
        SLURM_FOO="x-slurm-foo",
        # would move the job to another partition, with a 5-minute limit, under another name
        SBATCH_PARTITION="low",
        SBATCH_TIMELIMIT="5",
        SBATCH_JOB_NAME="not-ours",
        SBATCH_EXPORT="ALL",
        # would make squeue answer in another format: status must still read it
        SQUEUE_FORMAT="%all",
        PATH="/opt/hpcfed/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    )
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        cmd,
        "--json",
        user=slurm_cluster.user,
        env=shell,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]

    # Slurm holds the job as planned, not as the shell's SBATCH_* would have it.
    show = run(["scontrol", "show", "job", job_id]).stdout
    assert "Partition=debug" in show and "TimeLimit=01:00:00" in show, show
    assert f"JobName=hpcfed-{name}" in show, show

    dep = wait_done(slurm_cluster, shell, name)
    assert dep["job_state"] == "COMPLETED", dep
    log = hpcfed("logs", name, user=slurm_cluster.user, env=user_state).stdout
    assert "x-secret" not in log and "x-slurm-foo" not in log, log
    assert "PW=[] TOKEN=[] FOO=[] LC=[]" in log, log
    # What the role needs is there: the user's HOME and USER, Slurm's own variables, the PATH.
    assert f"HOME=[/home/{slurm_cluster.user}] USER=[{slurm_cluster.user}] JOB=[{job_id}]" in log
    assert "PATH=[/opt/hpcfed/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin]" in log, log
    assert "role ended: exit code 0" in log


# ---------------------------------------------------------------- JobEnvironment, no Slurm


def test_the_job_environment_is_read_from_slurms_variables():
    from hpcfed.supervisor.job_environment import JobEnvironment, JobPaths

    env = JobEnvironment.read(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_RESTART_COUNT": "2",
            "SLURMD_NODENAME": "node3",
            "SLURM_JOB_NODELIST": "node3",
            "CUDA_VISIBLE_DEVICES": "0,1",
        },
        site_allows_requeue=True,
    )
    assert (env.job_id, env.restart, env.node, env.node_list, env.gpus) == (
        "4242",
        2,
        "node3",
        "node3",
        "0,1",
    )
    assert env.in_slurm and env.requeue_allowed
    paths = JobPaths(Path("/d"), env.job_id)
    assert (paths.status, paths.hosts, paths.tunnel_ready, paths.events) == (
        Path("/d/status-4242.json"),
        Path("/d/hosts-4242"),
        Path("/d/tunnel-4242.ready"),
        Path("/d/events.jsonl"),
    )


def test_outside_slurm_there_is_no_job_to_requeue():
    import os

    from hpcfed.supervisor.job_environment import NO_JOB, JobEnvironment

    env = JobEnvironment.read({"SLURM_RESTART_COUNT": ""}, site_allows_requeue=True)
    assert (env.job_id, env.restart, env.node) == (NO_JOB, 0, os.uname().nodename)
    assert not env.in_slurm and not env.requeue_allowed


def test_the_site_profile_can_forbid_requeue():
    from hpcfed.supervisor.job_environment import JobEnvironment

    env = JobEnvironment.read({"SLURM_JOB_ID": "1"}, site_allows_requeue=False)
    assert env.in_slurm and not env.requeue_allowed


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (subprocess.CompletedProcess([], 0, "", ""), ("requeued", "scontrol requeue")),
        (
            subprocess.CompletedProcess([], 1, "", "scontrol: error: Job is not requeueable\n"),
            ("refused", "scontrol: error: Job is not requeueable"),
        ),
        (FileNotFoundError("scontrol"), ("failed", "scontrol")),
    ],
)
def test_requeue_asks_scontrol_for_this_job(result, expected):
    from hpcfed.supervisor.job_environment import requeue

    asked = []

    def fake_run(argv, **kwargs):
        asked.append(argv)
        if isinstance(result, Exception):
            raise result
        return result

    assert requeue("4242", run=fake_run) == expected
    assert asked == [["scontrol", "requeue", "4242"]]
