"""The whole federation, end to end, on real parts: the test cluster's Slurm, Apptainer images
built by `hpcfed image build`, kits from a real NVFlare dashboard, a wireguard-go hub in a
network namespace and hpcfed's userspace tunnel — driven by the same code as `make demo`
(demo/federation.py). One client is preempted mid-training; it must come back by itself and the
training job must still finish. Any bypassed part fails a check below.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import need, run

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # demo/ only: hpcfed itself comes from the installed package

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.apptainer,
    pytest.mark.nvflare,
    pytest.mark.wireguard,
]


def _status(name):
    from demo.federation import hpcfed_json

    return hpcfed_json("status", name)["deployments"][0]


def _slow_job(tmp_path) -> Path:
    """The demo job with enough rounds (and time per round) to be preempted in the middle."""
    job = tmp_path / "hello-numpy-long"
    shutil.copytree(REPO / "demo" / "jobs" / "hello-numpy", job)
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    cfg["workflows"][0]["args"]["num_rounds"] = 6
    # Each round waits this long for the preempted client's answer, then goes on with the other
    # client's (NVFlare does not hand a running job to a restarted client).
    cfg["workflows"][0]["args"]["train_timeout"] = 15
    server.write_text(json.dumps(cfg))
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["sleep_time"] = 3
    client.write_text(json.dumps(cfg))
    os.chmod(tmp_path, 0o755)
    return job


@pytest.fixture(scope="module")
def federation(slurm_cluster, tmp_path_factory):
    for tool in ("apptainer", "wireguard-go", "wg", "zip"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/bootstrap)")
    need(
        os.path.exists("/var/cache/hpcfed/base-bookworm.sif"),
        "the offline base image (30-apptainer.sh)",
    )
    from demo import federation as demo

    if demo.STATE_DIR.exists():
        demo.Federation().down()
    fed = demo.Federation(demo.State())
    try:
        fed.prepare()
        fed.launch()
        yield fed
    finally:
        for name in fed.state.deployments:
            print(f"----- hpcfed logs {name}")
            print(
                run(
                    ["runuser", "-u", demo.USER, "--", *demo.HPCFED, "logs", name],
                    env={"HOME": str(fed.home)},
                ).stdout[-4000:]
            )
        fed.down()


@pytest.mark.timeout(900)
def test_training_finishes_through_the_tunnel_while_a_client_is_preempted(federation, tmp_path):
    fed = federation
    victim = "demo-hospital-a"
    before = _status(victim)
    node = before["node"]
    events, preempted = [], {}

    def on_event(ev):
        events.append(ev)

    result = {}
    trainer = threading.Thread(
        target=lambda: result.update(
            fed.run_training(timeout=600, job_src=_slow_job(tmp_path), on_event=on_event)
        )
    )
    trainer.start()
    deadline = time.monotonic() + 180
    while not any(e.get("status") == "RUNNING" for e in events):
        assert time.monotonic() < deadline and trainer.is_alive(), events
        time.sleep(1)
    time.sleep(8)  # a round or two in
    # A high-priority job that needs every GPU of the victim's node preempts the client.
    high = run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "high",
            "-w",
            node,
            "--gres=gpu:a40:4",
            "--chdir=/tmp",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 15",
        ],
        env=fed_env(),
    )
    assert high.returncode == 0, high.stderr
    preempted["at"] = time.time()
    trainer.join(timeout=700)
    assert not trainer.is_alive(), "training did not end"
    # Every round ran to the end. NVFlare 2.9 still marks a job ABNORMAL when a participant
    # restarted during it ("terminal outcome unavailable ... missing job on client").
    assert result.get("status", "").startswith("FINISHED"), (result, events)
    server_log = _logs(fed, "demo-server")
    assert "Round 5 finished" in server_log and "Finished ScatterAndGather Training" in server_log

    # The client came back by itself: same deployment, same job, restarted by Slurm.
    after = _status(victim)
    assert after["job_id"] == before["job_id"]
    assert after["job_state"] == "RUNNING"
    kinds = [e["event"] for e in after["events"]]
    assert "stopped" in kinds or "stopping" in kinds, after["events"]
    restart = run(["scontrol", "show", "job", after["job_id"], "-o"], env=fed_env()).stdout
    assert "Restarts=1" in restart or "Restarts=2" in restart, restart
    log = _logs(fed, victim)
    # The role was stopped on the warning signal, not killed; the job requeued itself.
    assert "preemption or time limit ahead (preemption); stopping the role" in log
    assert "sending SIGTERM to the role" in log and "SIGKILL" not in log
    assert "requeued job" in log and ("DUE TO JOB REQUEUE" in log or "DUE TO PREEMPTION" in log)
    # The role inside the image: NVFlare ran from the image's venv, which the host does not have.
    assert "/opt/fl/venv" in log and not Path("/opt/fl/venv").exists()
    assert "apptainer" in log and "exec" in log

    # The rejoined client is a full member again: the next job trains with both clients.
    again = fed.run_training(timeout=300)
    assert again.get("status") == "FINISHED:COMPLETED", again
    assert again["job_id"] in _logs(fed, victim)

    # Only through the tunnel: every role's traffic crossed the hub, and the clients' containers
    # resolved the server name to their own forward.
    traffic = fed.hub_traffic()
    for peer in ("fl-server", "hospital-a", "hospital-b"):
        assert traffic[peer].get("rx_bytes", 0) > 20_000, traffic
    assert "fl-server -> 127.0.11.1" in log


def fed_env():
    return {"SLURM_CONF": "/var/lib/hpcfed/testcluster/etc/slurm.conf"}


def _logs(fed, name):
    from demo.federation import HPCFED, USER

    return run(
        ["runuser", "-u", USER, "--", *HPCFED, "logs", name], env={"HOME": str(fed.home)}
    ).stdout
