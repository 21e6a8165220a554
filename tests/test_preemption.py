"""Real preemption on the test cluster: a client in the preemptable partition is preempted by a
high-priority job, stops its role gracefully on the warning signal, is requeued and runs again
with no user action; the restart is recorded in the deployment's history."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from helpers import hpcfed, run

pytestmark = pytest.mark.slurm
ROLE = "trap 'echo \"role got TERM, saving state\"; exit 0' TERM; echo role-started; while :; do sleep 0.1; done"


def log_of(cluster, name):
    return hpcfed("logs", name, user=cluster.user).stdout


def wait_log(cluster, name, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        log = log_of(cluster, name)
        if predicate(log):
            return log
        time.sleep(0.5)
    pytest.fail(f"{what} not seen in {timeout}s; log:\n{log}")


@pytest.mark.timeout(300)
def test_preempted_client_stops_gracefully_and_runs_again(slurm_cluster):
    name = f"pre-{uuid.uuid4().hex[:6]}"
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "4",
        "--partition",
        "preemptable",
        "--name",
        name,
        "--command",
        ROLE,
        "--json",
        user=slurm_cluster.user,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    high = None
    try:
        wait_log(slurm_cluster, name, lambda l: "\nrole-started" in l, 90, "role start")
        node = run(["squeue", "--noheader", "-j", job_id, "--format=%N"]).stdout.strip()
        assert node.startswith("node")

        # A high-priority job that needs exactly what the client holds.
        res = run(
            [
                "sbatch",
                "--parsable",
                "--partition=high",
                f"--nodelist={node}",
                "--gres=gpu:a40:4",
                f"--account={slurm_cluster.account}",
                "--output=/dev/null",
                "--wrap",
                "sleep 5",
            ]
        )
        assert res.returncode == 0, res.stderr
        high = res.stdout.strip()

        log = wait_log(
            slurm_cluster,
            name,
            lambda l: l.count("\nrole-started") >= 2,
            150,
            "the role running again",
        )
        first, again = log.split("restart 1", 1)
        # stopped gracefully, before the restart
        assert "received SIGUSR2: preemption or time limit ahead (preemption)" in first
        assert "role got TERM, saving state" in first
        assert "requeued job" in first or "DUE TO PREEMPTION" in first
        assert "\nrole-started" in again

        dep = json.loads(hpcfed("status", name, "--json", user=slurm_cluster.user).stdout)[
            "deployments"
        ][0]
        assert (
            dep["job_id"] == job_id and dep["job_state"] == "RUNNING"
        )  # same job, no resubmission
        events = [e["event"] for e in dep["events"]]
        assert events.index("role-stopped") < events.index("running-again"), events
        running_again = [e for e in dep["events"] if e["event"] == "running-again"][0]
        assert running_again["restart"] == 1
        assert "Restarts=1" in run(["scontrol", "show", "job", job_id]).stdout
        # the table form shows the history in words
        table = hpcfed("status", name, user=slurm_cluster.user).stdout
        assert "role-stopped" in table and "running-again" in table
    finally:
        hpcfed("cancel", name, user=slurm_cluster.user)
        if high:
            run(["scancel", high])
