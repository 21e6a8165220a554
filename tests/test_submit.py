"""`hpcfed submit | status | logs | cancel` against the real local Slurm cluster, as a
non-root user: the job really runs with the GPUs it asked for, in every GPU dialect."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, run, slurm_wrapper, user_xdg

pytestmark = pytest.mark.slurm


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def as_user(cluster, *args, env=None, timeout=120):
    return hpcfed(*args, user=cluster.user, env=env, timeout=timeout)


def wait_state(cluster, name, states, timeout=60, env=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        proc = as_user(cluster, "status", name, "--json", env=env)
        if proc.returncode == 0:
            last = json.loads(proc.stdout)["deployments"][0]
            if last["job_state"] in states:
                return last
        time.sleep(0.5)
    pytest.fail(f"{name} never reached {states}: last {last}")


def read_log(cluster, name, needle, timeout=30, env=None):
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        proc = as_user(cluster, "logs", name, env=env)
        out = proc.stdout
        if needle in out:
            return out
        time.sleep(0.5)
    pytest.fail(f"{needle!r} not in the log of {name}: {out!r}")


@pytest.mark.timeout(240)
def test_submit_status_logs_cancel_with_two_gpus(slurm_cluster):
    name = unique("two-gpus")
    cmd = 'echo "GPUS=$CUDA_VISIBLE_DEVICES ON_NODE=$SLURM_GPUS_ON_NODE"; sleep 300'
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "2",
        "--name",
        name,
        "--command",
        cmd,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    submitted = json.loads(proc.stdout)
    job_id = submitted["job_id"]
    assert submitted["name"] == name and job_id.isdigit()

    dep = wait_state(slurm_cluster, name, {"RUNNING"})
    assert dep["job_id"] == job_id and dep["node"].startswith("node")

    # The table form lists it too.
    table = as_user(slurm_cluster, "status").stdout
    assert any(
        line.split()[:5] == [name, "local", "client", job_id, "RUNNING"]
        for line in table.splitlines()
    ), table

    # The role really sees two GPUs Slurm assigned.
    log = read_log(slurm_cluster, name, "GPUS=")
    line = [l for l in log.splitlines() if l.startswith("GPUS=")][0]
    assert len(line.split()[0].split("=")[1].split(",")) == 2, line
    assert "ON_NODE=2" in line

    proc = as_user(slurm_cluster, "cancel", name)
    assert proc.returncode == 0, proc.stderr
    dep = wait_state(slurm_cluster, name, {"CANCELLED", "COMPLETED", "FAILED"})
    assert dep["state"] == "STOPPED" and dep["stopped"] is True
    events = [e["event"] for e in dep["events"]]
    # hpcfed's own events and the job's (from its directory), in time order
    assert events[0] == "submitted" and "stopped" in events and "started" in events, events
    # and Slurm agrees the job is over
    squeue = run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"])
    assert squeue.stdout.strip() in ("", "CANCELLED", "COMPLETING", "COMPLETED")
    # The role was stopped by the supervisor and the end recorded in the log
    log = read_log(slurm_cluster, name, "role ended")
    assert "SIGTERM" in log


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "dialect,env,gpu_line",
    [
        ("untyped-gres", {"HPCFED_SITE__GPUS__DEFAULT_TYPE": "null"}, "#SBATCH --gres=gpu:2\n"),
        ("gpus", {"HPCFED_SITE__GPUS__DIALECT": "gpus"}, "#SBATCH --gpus=a40:2\n"),
        (
            "gpus-per-node",
            {
                "HPCFED_SITE__GPUS__DIALECT": "gpus-per-node",
                "HPCFED_SITE__GPUS__DEFAULT_TYPE": "null",
            },
            "#SBATCH --gpus-per-node=2\n",
        ),
    ],
)
def test_gpu_dialects_render_and_run(slurm_cluster, dialect, env, gpu_line):
    name = unique(dialect)
    args = [
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "2",
        "--name",
        name,
        "--command",
        'echo "GPUS=$CUDA_VISIBLE_DEVICES"',
    ]
    dry = as_user(slurm_cluster, *args, "--dry-run", env=env)
    assert dry.returncode == 0 and gpu_line in dry.stdout, dry.stdout
    proc = as_user(slurm_cluster, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    dep = wait_state(slurm_cluster, name, {"COMPLETED", "FAILED"}, env=env)
    assert dep["job_state"] == "COMPLETED", dep
    log = read_log(slurm_cluster, name, "GPUS=", env=env)
    gpus = [l for l in log.splitlines() if l.startswith("GPUS=")][0][5:]
    assert len(gpus.split(",")) == 2, log
    assert "role ended: exit code 0" in log


@pytest.mark.timeout(120)
def test_dry_run_touches_nothing(slurm_cluster):
    name = unique("dry")
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "1",
        "--name",
        name,
        "--command",
        "true",
        "--dry-run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"]["name"] == name and out["script"].startswith("#!/bin/bash")
    assert (
        run(["squeue", "--noheader", "--states=all", f"--name=hpcfed-{name}", "--format=%i"]).stdout
        == ""
    )
    assert as_user(slurm_cluster, "status", name).returncode == 8  # no such deployment
    assert not os.path.exists(f"/home/{slurm_cluster.user}/hpcfed/{name}")


@pytest.mark.timeout(120)
def test_rejected_submission_is_one_line_and_not_recorded(slurm_cluster):
    name = unique("rejected")
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "1",
        "--name",
        name,
        "--command",
        "true",
        "--partition",
        "nosuchpart",
    )
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("hpcfed: error: sbatch on local:") and "partition" in lines[-1].lower()
    )
    assert "Traceback" not in proc.stderr
    assert as_user(slurm_cluster, "status", name).returncode == 8


@pytest.mark.timeout(240)
def test_unreachable_scheduler_is_unknown_never_gone(slurm_cluster):
    """A controller that does not answer: submit says so and records nothing; status of a
    tracked job says UNKNOWN (exit 4), never that the job is gone."""
    import tempfile

    dead = Path(tempfile.mkdtemp(prefix="hpcfed-deadctl-"))  # readable by the job user
    etc = os.path.dirname(slurm_cluster.slurm_conf)
    conf = open(slurm_cluster.slurm_conf).read().replace("SlurmctldPort=6817", "SlurmctldPort=6999")
    assert "6999" in conf
    (dead / "slurm.conf").write_text(conf)
    shutil.copy(os.path.join(etc, "gres.conf"), dead / "gres.conf")
    os.chmod(dead, 0o755)
    env = {
        "HPCFED_SITE__SCHEDULER__ENV__SLURM_CONF": str(dead / "slurm.conf"),
        "HPCFED_SITE__SCHEDULER__TIMEOUT": "60",
    }

    name = unique("unreachable")
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--name",
        name,
        "--gpus",
        "0",
        "--command",
        "sleep 120",
        env=env,
    )
    assert proc.returncode == 4, proc.stderr
    assert "Unable to contact slurm controller" in proc.stderr
    # The intent recorded before sbatch stays: whether a job exists is unknown until the
    # scheduler answers (the next command that reaches it settles it).
    proc = as_user(slurm_cluster, "status", name, "--json", env=env)
    assert proc.returncode == 4, proc.stderr
    dep = json.loads(proc.stdout)["deployments"][0]
    assert dep["state"] == "UNKNOWN" and "interrupted" in dep["reason"] and dep["jobs"] == []

    # A real job, then the controller "goes away" for the record's scheduler settings.
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--name",
        name,
        "--gpus",
        "0",
        "--command",
        "sleep 120",
    )
    assert proc.returncode == 0, proc.stderr
    state_dir = user_xdg(slurm_cluster.user)["XDG_STATE_HOME"]
    state_file = os.path.join(state_dir, "hpcfed", "deployments", f"{name}.json")
    record = json.load(open(state_file))
    record["plan"]["scheduler"]["env"]["SLURM_CONF"] = str(dead / "slurm.conf")
    with open(state_file, "w") as f:
        json.dump(record, f)
    try:
        proc = as_user(slurm_cluster, "status", name, "--json")
        assert proc.returncode == 4, proc.stderr
        dep = json.loads(proc.stdout)["deployments"][0]
        assert dep["state"] == "UNKNOWN" and "Unable to contact slurm controller" in dep["reason"]
    finally:
        run(["scancel", record["jobs"][0]["job_id"]])
        os.unlink(state_file)  # later `hpcfed status` calls of this user must not wait on it
        shutil.rmtree(dead, ignore_errors=True)


@pytest.mark.timeout(180)
def test_status_polls_all_deployments_in_one_call(slurm_cluster):
    names = [unique("batch") for _ in range(3)]
    for name in names:
        proc = as_user(
            slurm_cluster,
            "submit",
            "client",
            "--site",
            "local",
            "--gpus",
            "0",
            "--name",
            name,
            "--command",
            "sleep 60",
        )
        assert proc.returncode == 0, proc.stderr
    proc = as_user(slurm_cluster, "status", *names, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["scheduler_calls"] == 1  # one squeue for all three, none missing
    assert {d["job_state"] for d in data["deployments"]} <= {"PENDING", "RUNNING", "CONFIGURING"}
    # a second submit of a live name is refused; nothing new is queued
    proc = as_user(
        slurm_cluster,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        names[0],
        "--command",
        "sleep 60",
    )
    assert proc.returncode == 3 and "already has job" in proc.stderr
    for name in names:
        assert as_user(slurm_cluster, "cancel", name).returncode == 0


@pytest.mark.timeout(120)
def test_logs_follow_prints_until_the_job_ends(slurm_cluster):
    name = unique("follow")
    cmd = "for i in 1 2 3; do echo tick-$i; sleep 1; done; echo last-line"
    proc = as_user(
        slurm_cluster,
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
    )
    assert proc.returncode == 0, proc.stderr
    proc = as_user(slurm_cluster, "logs", name, "--follow", timeout=90)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [l for l in lines if l.startswith("tick-")] == ["tick-1", "tick-2", "tick-3"]
    assert "last-line" in lines and "role ended: exit code 0" in proc.stdout
    assert "COMPLETED" in proc.stderr  # it stopped because the job ended


@pytest.mark.timeout(120)
def test_doctor_checks_the_site_and_says_what_to_fix(slurm_cluster):
    proc = as_user(slurm_cluster, "doctor", "--site", "local", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {r["check"]: r for r in json.loads(proc.stdout)}
    for check in (
        "profile",
        "scheduler",
        "accounting",
        "partition default",
        "partition preemptable",
        "gpus",
        "apptainer",
        "hpcfed on cluster",
    ):
        assert checks[check]["ok"], checks[check]

    import tempfile

    top = Path(tempfile.mkdtemp(prefix="hpcfed-doctor-"))  # readable by the cluster user
    cfg = top / "hpcfed" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "wrongpart.yaml").write_text(
        "extends: local\npartitions: {default: nosuch}\ngpus: {types: [a40, h100]}\n"
    )
    for d in (top, top / "hpcfed", cfg):
        os.chmod(d, 0o755)
    try:
        proc = as_user(
            slurm_cluster, "doctor", "--site", "wrongpart", env={"XDG_CONFIG_HOME": str(top)}
        )
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    fails = [l for l in proc.stdout.splitlines() if " FAIL " in l]
    assert any(
        "partition default" in l and "nosuch" in l and "partitions.default" in l for l in fails
    ), proc.stdout
    assert any("gpus" in l and "h100" in l for l in fails), proc.stdout


@pytest.mark.timeout(120)
def test_doctor_reports_a_hanging_sacct_as_its_check_and_the_rest_still(slurm_cluster, tmp_path):
    # CI once saw `doctor --json` print nothing: a scheduler command after the ping took longer
    # than scheduler.timeout and its error ended the whole report. Here sacct really hangs.
    with slurm_wrapper("sacct", 'sleep 30\nexec "$REAL" "$@"') as path:
        sites = tmp_path / "cfg" / "hpcfed" / "sites"
        sites.mkdir(parents=True)
        (sites / "slowdbd.yaml").write_text(
            f"extends: local\nscheduler:\n  timeout: 3\n  env:\n    PATH: {path}\n"
        )
        proc = hpcfed(
            "doctor", "--site", "slowdbd", "--json", env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        )
    assert proc.returncode == 7 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    checks = {r["check"]: r for r in json.loads(proc.stdout)}
    assert checks["scheduler"]["ok"]
    assert not checks["accounting"]["ok"]
    assert "sacct did not answer within 3s" in checks["accounting"]["detail"], checks
    # the checks after it still ran
    assert checks["partition default"]["ok"] and checks["apptainer"]["ok"], checks
