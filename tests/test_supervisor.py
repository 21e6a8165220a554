"""The in-job supervisor: it starts the role, stops it gracefully on the warning signal (TERM,
then KILL after the grace time), and reports the role's exit - as a process here and inside a
real Slurm job signalled through the scheduler."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

import pytest
from helpers import HPCFED, hpcfed, run

ROLE_GRACEFUL = (
    "trap 'echo \"role got TERM\"; exit 0' TERM; echo role-started; while :; do sleep 0.1; done"
)
ROLE_STUBBORN = (
    "trap 'echo \"role ignores TERM\"' TERM; echo role-started; while :; do sleep 0.1; done"
)


def make_plan(tmp_path, command, grace="2s", requeue=True):
    from hpcfed.frameworks import role
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site

    site = load_site(
        "local",
        environ={
            "HPCFED_SITE__PREEMPTION__GRACE": grace,
            "HPCFED_SITE__PREEMPTION__REQUEUE": str(requeue).lower(),
        },
    )
    plan = build_plan(
        site=site,
        role=role("nvflare", "client"),
        name="sup",
        deployment_id="d1",
        user="u",
        gpus=0,
        command=command,
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def start(plan_path, env=None):
    return subprocess.Popen(
        HPCFED + ["job", "run", str(plan_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(__import__("os").environ, SLURM_JOB_ID="777", **(env or {})),
    )


def wait_started(proc):
    for line in proc.stdout:
        if line.strip() == "role-started":  # not the log line quoting the command
            return
    pytest.fail("role never started")


@pytest.mark.timeout(60)
def test_user_signal_stops_the_role_gracefully(tmp_path):
    """Warning signal, no requeue allowed: the role stops at once, the supervisor stays until
    Slurm ends the job (so the job's final state says PREEMPTED/TIMEOUT, not COMPLETED)."""
    plan = make_plan(tmp_path, ROLE_GRACEFUL, requeue=False)
    proc = start(plan)
    wait_started(proc)
    proc.send_signal(signal.SIGUSR2)
    out = ""
    for line in proc.stdout:
        out += line
        if "waiting for Slurm to end the job" in line:
            break
    assert proc.poll() is None  # still there, holding the job
    proc.send_signal(signal.SIGTERM)  # Slurm ending the job
    out += proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert "received SIGUSR2: preemption or time limit ahead" in out
    assert "sending SIGTERM to the role" in out and "role got TERM" in out
    report = json.loads((tmp_path / "status-777.json").read_text())
    assert report["exit_code"] == 0 and report["reason"].startswith("SIGUSR2")
    events = [json.loads(l)["event"] for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == ["started", "role-stopped", "not-requeued"]


@pytest.mark.timeout(60)
def test_a_role_ignoring_term_is_killed_after_the_grace_time(tmp_path):
    plan = make_plan(tmp_path, ROLE_STUBBORN, grace="2s")
    proc = start(plan)
    wait_started(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    code = proc.wait(timeout=30)
    assert "role ignores TERM" in out and "SIGKILL" in out
    assert code == 137  # 128 + KILL
    assert 1.5 < time.monotonic() - t0 < 15


@pytest.mark.timeout(30)
def test_role_exit_code_becomes_the_job_exit_code(tmp_path):
    plan = make_plan(tmp_path, "echo role-started; exit 3")
    proc = start(plan)
    out = proc.stdout.read()
    assert proc.wait(timeout=20) == 3
    assert "role ended: exit code 3 (role exited)" in out


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_warning_signal_through_slurm_reaches_the_supervisor(slurm_cluster):
    name = f"sig-{uuid.uuid4().hex[:6]}"
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
        ROLE_GRACEFUL,
        "--json",
        user=slurm_cluster.user,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    log = ""
    deadline = time.monotonic() + 60
    while "\nrole-started" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
        log = hpcfed("logs", name, user=slurm_cluster.user).stdout
    # what Slurm does ahead of preemption/time limit with --signal=B:USR2@lead
    assert run(["scancel", "--batch", "--signal=USR2", job_id]).returncode == 0
    deadline = time.monotonic() + 60
    while "role ended" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
        log = hpcfed("logs", name, user=slurm_cluster.user).stdout
    assert "received SIGUSR2" in log and "role got TERM" in log
    hpcfed("cancel", name, user=slurm_cluster.user)


def test_a_plan_it_cannot_read_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"name": 1}')
    proc = hpcfed("job", "run", str(bad))
    assert proc.returncode == 3
    assert (
        proc.stderr.strip()
        == f"hpcfed: error: {bad}: not a plan this hpcfed can run (name: Input should be a valid string)"
    )


@pytest.mark.timeout(60)
def test_tunnel_failure_is_reported_with_the_tunnels_own_reason(tmp_path):
    """The supervisor starts the tunnel through hpcfed.tunnel.job (the one implementation): a
    hub that never answers ends the job with exit 9 and the tunnel's own one-line reason
    ("no UDP egress to the hub ...") in the job's report, not "exited with code 9"."""
    import os

    from hpcfed.tunnel import keys

    conf = tmp_path / "wg.conf"
    conf.write_text(
        "[Interface]\n"
        f"PrivateKey = {keys.generate_private()}\n"
        "Address = 10.221.0.9/32\n"
        "[Peer]\n"
        f"PublicKey = {keys.public_from_private(keys.generate_private())}\n"
        "Endpoint = 127.0.0.1:9\n"
        "AllowedIPs = 10.220.0.0/14\n"
    )
    os.chmod(conf, 0o600)
    plan_path = make_plan(tmp_path, ROLE_GRACEFUL)
    plan = json.loads(plan_path.read_text())
    plan["tunnel"] = {
        "config": str(conf),
        "local_forwards": ["127.0.0.1:39998=10.220.0.2:8002"],
        "ready_timeout": 4,
    }
    plan_path.write_text(json.dumps(plan))
    proc = start(plan_path)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 9, out
    report = json.loads((tmp_path / "status-777.json").read_text())
    assert report["reason"].startswith("no UDP egress to the hub 127.0.0.1:9"), report
    assert "role-started" not in out
