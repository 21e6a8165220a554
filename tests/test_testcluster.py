"""The local test cluster against its real daemons: GPUs, users, preemption, lifecycle."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import hpcfed, run

pytestmark = pytest.mark.slurm


def _submit(cluster, *args, user=None, workdir=None):
    """sbatch --parsable as `user` (default the cluster's non-root user); returns the job id."""
    user = user or cluster.user
    workdir = workdir or _userdir(user)
    proc = run(["sbatch", "--parsable", f"--chdir={workdir}", *args], user=user, env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], workdir


def _userdir(user):
    d = tempfile.mkdtemp(prefix="tc-", dir="/tmp")
    os.chmod(d, 0o777)
    return d


def _wait_state(cluster, job, states, timeout=90):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        proc = run(["scontrol", "show", "job", job, "-o"], env=cluster.env)
        for tok in proc.stdout.split():
            if tok.startswith("JobState="):
                state = tok.split("=", 1)[1]
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} never reached {states} (last {state})")


def _job_field(cluster, job, field):
    proc = run(["scontrol", "show", "job", job, "-o"], env=cluster.env)
    for tok in proc.stdout.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return None


@pytest.mark.timeout(120)
def test_typed_gres_job_sees_two_gpus_as_the_submitting_user(slurm_cluster):
    job, workdir = _submit(
        slurm_cluster,
        "--gres=gpu:a40:2",
        "--wrap",
        "echo USER=$(id -un); echo CVD=$CUDA_VISIBLE_DEVICES; echo N=$SLURM_GPUS_ON_NODE",
    )
    assert _wait_state(slurm_cluster, job, {"COMPLETED", "FAILED"}) == "COMPLETED"
    text = Path(workdir, f"slurm-{job}.out").read_text()
    out = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and " " not in line)
    assert out.get("USER") == slurm_cluster.user, text  # ran as the non-root user, not root
    assert len(out["CVD"].split(",")) == 2, text
    assert out["N"] == "2", text
    assert Path(workdir, f"slurm-{job}.out").stat().st_uid != 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("request_flag", ["--gres=gpu:2", "--gpus=2"])
def test_untyped_gpu_dialects_schedule_too(slurm_cluster, request_flag):
    job, workdir = _submit(slurm_cluster, request_flag, "--wrap", "echo $CUDA_VISIBLE_DEVICES")
    assert _wait_state(slurm_cluster, job, {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert len(Path(workdir, f"slurm-{job}.out").read_text().strip().split(",")) == 2


def test_more_gpus_than_a_node_has_is_refused_with_slurms_message(slurm_cluster):
    proc = run(
        ["sbatch", "--gres=gpu:a40:5", "--wrap", "true"],
        user=slurm_cluster.user,
        env=slurm_cluster.env,
        cwd="/tmp",
    )
    assert proc.returncode != 0
    assert "Requested node configuration is not available" in proc.stderr


def test_unknown_gpu_type_is_refused(slurm_cluster):
    proc = run(
        ["sbatch", "--gres=gpu:h100:1", "--wrap", "true"],
        user=slurm_cluster.user,
        env=slurm_cluster.env,
        cwd="/tmp",
    )
    assert proc.returncode != 0
    assert "error" in proc.stderr.lower()


def test_accounting_records_jobs(slurm_cluster):
    job, _ = _submit(slurm_cluster, "--wrap", "true")
    _wait_state(slurm_cluster, job, {"COMPLETED"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc = run(
            ["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State,User"], env=slurm_cluster.env
        )
        if proc.stdout.strip().endswith("|COMPLETED|" + slurm_cluster.user):
            break  # records arrive 1-3 s after the job ends, earlier states first
        time.sleep(1)
    assert proc.stdout.strip() == f"{job}|COMPLETED|{slurm_cluster.user}"


@pytest.mark.timeout(240)
def test_low_priority_job_is_preempted_signalled_and_requeued(slurm_cluster):
    """A job in `low` gets its user signal when `high` needs the node, then runs again."""
    script = (
        "#!/bin/bash\n"
        "trap 'echo GOT_USR1 restart=${SLURM_RESTART_COUNT:-0}' USR1\n"
        "echo START restart=${SLURM_RESTART_COUNT:-0}\n"
        "for i in $(seq 1 600); do sleep 0.2; done\n"
    )
    workdir = _userdir(slurm_cluster.user)
    Path(workdir, "low.sh").write_text(script)
    low, _ = _submit(
        slurm_cluster,
        "-p",
        "low",
        "-w",
        "node3",
        "--exclusive",
        "--requeue",
        "--signal=B:USR1@60",
        "--open-mode=append",
        "-o",
        "low.out",
        "low.sh",
        workdir=workdir,
    )
    _wait_state(slurm_cluster, low, {"RUNNING"})
    high, _ = _submit(
        slurm_cluster,
        "-p",
        "high",
        "-w",
        "node3",
        "--exclusive",
        "--wrap",
        "sleep 3",
        workdir=workdir,
    )
    # The low job is requeued and, once the high job is done, runs again as a restart.
    deadline = time.monotonic() + 180
    out = ""
    while time.monotonic() < deadline:
        out = Path(workdir, "low.out").read_text()
        if "START restart=1" in out:
            break
        time.sleep(1)
    assert "GOT_USR1 restart=0" in out, out  # the user signal reached the batch shell
    assert "START restart=1" in out, out
    assert "DUE TO PREEMPTION" in out
    assert _job_field(slurm_cluster, low, "Restarts") == "1"
    sacct = run(
        ["sacct", "-j", low, "-D", "-X", "-n", "-P", "-o", "State"], env=slurm_cluster.env
    ).stdout.split()
    assert "PREEMPTED" in sacct or "REQUEUED" in sacct, sacct
    run(["scancel", low, high], env=slurm_cluster.env)


def test_second_up_reports_the_running_cluster(slurm_cluster):
    proc = hpcfed("testcluster", "up", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["already_running"] is True
    assert info["env"]["SLURM_CONF"] == slurm_cluster.slurm_conf


def test_env_points_clients_at_the_cluster(slurm_cluster):
    proc = hpcfed("testcluster", "env")
    assert proc.stdout.strip() == f"export SLURM_CONF={slurm_cluster.slurm_conf}"
    # A shell with no SLURM_CONF reaches the cluster after eval'ing that line.
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    shell = subprocess.run(
        ["bash", "-c", 'eval "$(cat)"; sinfo -h -o %P'],
        input=proc.stdout,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "debug*" in shell.stdout.split()


def test_status_json_shows_nodes_partitions_gpus_and_jobs(slurm_cluster):
    job, _ = _submit(slurm_cluster, "--gres=gpu:a40:1", "--wrap", "sleep 20")
    _wait_state(slurm_cluster, job, {"RUNNING"})
    proc = hpcfed("testcluster", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["up"] is True
    assert [n["name"] for n in info["nodes"]] == ["node1", "node2", "node3"]
    assert all(n["gres"] == "gpu:a40:4" for n in info["nodes"])
    parts = {p["name"]: p for p in info["partitions"]}
    assert parts["low"]["preempt_mode"] == "REQUEUE" and parts["debug"]["default"]
    assert parts["high"]["priority_tier"] > parts["low"]["priority_tier"]
    assert any(j["id"] == job and j["state"] == "RUNNING" for j in info["jobs"])
    run(["scancel", job], env=slurm_cluster.env)


def test_up_as_non_root_says_it_needs_root(slurm_cluster):
    proc = hpcfed("testcluster", "up", user=slurm_cluster.user)
    assert proc.returncode == 7
    assert "must run as root" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_up_names_the_port_that_is_taken(slurm_cluster, tmp_path):
    # A second cluster in another prefix collides with the running one's ports.
    proc = hpcfed("testcluster", "up", "--prefix", str(tmp_path / "second"))
    assert proc.returncode == 7
    assert "port 13306 (needed by mariadb) is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "second" / "etc").exists()  # nothing touched


def test_a_package_that_cannot_be_installed_is_named():
    from hpcfed.errors import EnvironmentProblem
    from hpcfed.testcluster.cluster import install_packages

    with pytest.raises(EnvironmentProblem, match="hpcfed-no-such-package"):
        install_packages(["hpcfed-no-such-package"], lambda _: None)


def _cluster_processes(prefix):
    from hpcfed.testcluster.daemons import marked_processes

    return marked_processes(prefix)


def _live_commands():
    """Names of the live (not zombie) processes in this PID namespace."""
    own = os.readlink("/proc/self/ns/pid")
    names = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "pid") != own:
                continue
            stat = (proc / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if state != "Z":
            names.add(comm)
    return names


@pytest.mark.timeout(300)
def test_down_leaves_no_daemon_behind_and_up_restores(slurm_cluster):
    # A running job must not survive either.
    job, _ = _submit(slurm_cluster, "--wrap", "sleep 300")
    _wait_state(slurm_cluster, job, {"RUNNING"})
    table = json.loads(Path(slurm_cluster.prefix, "run", "daemons.json").read_text())
    pids = [d["pid"] for d in table]
    proc = hpcfed("testcluster", "down", "--json")
    assert proc.returncode == 0, proc.stderr
    stopped = json.loads(proc.stdout)["stopped"]
    assert {"slurmctld", "slurmdbd", "mariadb", "slurmd-node1"} <= set(stopped)
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
    assert _cluster_processes(slurm_cluster.prefix) == []
    # No live daemon of any kind (zombies left for PID 1 to reap do not count).
    # Only this PID namespace counts: the docker test cluster's containers run their own
    # slurmctld and slurmd, which the host's process list shows too.
    assert not {"slurmctld", "slurmd", "slurmdbd", "mariadbd", "slurmstepd"} & _live_commands()
    again = hpcfed("testcluster", "down")
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    up = hpcfed("testcluster", "up", "--json", timeout=300)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["already_running"] is False
