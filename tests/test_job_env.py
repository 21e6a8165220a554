"""What the submitting shell may and may not change about a job, against the real Slurm cluster.

The shell that runs `hpcfed submit` holds secrets (HPCFED_DASHBOARD_PASSWORD, which the docs tell
users to export; cloud tokens) and variables that steer Slurm's commands (SBATCH_*, SLURM_*,
SQUEUE_*). None of them may reach the job or change what is submitted: the job gets PATH, HOME,
USER and LOGNAME from the shell, the user's login environment on the node (Slurm loads it) and
what Slurm itself sets.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid

import pytest
from helpers import hpcfed, run

pytestmark = pytest.mark.slurm


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
