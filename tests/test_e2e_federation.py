"""The whole federation, end to end, on real parts: the test cluster's Slurm, Apptainer images
built by `hpcfed image build`, kits from a real NVFlare dashboard, a wireguard-go hub in a
network namespace and hpcfed's userspace tunnel — driven by the same code as `make demo`
(demo/federation.py). One client is preempted mid-training; it must come back by itself and the
training job must still finish. Any bypassed part fails a check below.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import need, run

from hpcfed.plan import job_loopback

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # demo/ only: hpcfed itself comes from the installed package

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.apptainer,
    pytest.mark.nvflare,
    pytest.mark.wireguard,
]


USER = "hpcuser"  # demo.federation's user


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

    # The demo's own folders (XDG dirs, work directories, hub state) start empty: nothing an
    # earlier run left can make this test pass or fail.
    demo.Federation().down()
    fed = demo.Federation(demo.State())
    try:
        fed.prepare()
        fed.launch()
        yield fed
    finally:
        for name in fed.state.deployments:
            print(f"----- hpcfed logs {name}")
            print(_logs(fed, name)[-4000:])
        fed.down()


@pytest.mark.timeout(900)
def test_training_finishes_through_the_tunnel_while_a_client_is_preempted(federation, tmp_path):
    fed = federation
    victim = "demo-hospital-a"
    before = _status(victim)
    node = before["node"]
    events = []

    traffic_before = fed.hub_traffic()
    result = {}
    trainer = threading.Thread(
        target=lambda: result.update(
            fed.run_training(timeout=600, job_src=_slow_job(tmp_path), on_event=events.append)
        )
    )
    trainer.start()
    deadline = time.monotonic() + 180
    while not any(e.get("status") == "RUNNING" for e in events):
        assert time.monotonic() < deadline and trainer.is_alive(), events
        time.sleep(1)
    # Inside each role's own container (not hpcfed's log line): the server name resolves to the
    # tunnel's forward, and the role runs on the image's Python, which the host does not have.
    # The clients' forwards follow from --server-ip: each on its deployment's own loopback.
    forwards = {
        "server": None,
        "hospital-a": job_loopback(USER, "demo-hospital-a"),
        "hospital-b": job_loopback(USER, "demo-hospital-b"),
    }
    assert len(set(forwards.values())) == 3
    for role, address in forwards.items():
        _assert_inside_container(role, address)
    # A round in: wait for the server's first round, then preempt.
    deadline = time.monotonic() + 120
    while "Round 0 started" not in _logs(fed, "demo-server"):
        assert time.monotonic() < deadline, "no round started"
        time.sleep(1)
    time.sleep(4)
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
    trainer.join(timeout=700)
    assert not trainer.is_alive(), "training did not end"
    traffic_after = fed.hub_traffic()
    # Every round ran to the end. NVFlare 2.9 still marks a job ABNORMAL when a participant
    # restarted during it ("terminal outcome unavailable ... missing job on client").
    assert result.get("status", "").startswith("FINISHED"), (result, events)
    server_log = _logs(fed, "demo-server")
    assert "Round 5 finished" in server_log and "Finished ScatterAndGather Training" in server_log

    # The client came back by itself: same deployment, same job, restarted by Slurm.
    after = _status(victim)
    assert after["job_id"] == before["job_id"]
    assert after["job_state"] == "RUNNING"
    stopped = [e for e in after["events"] if e["event"] == "role-stopped"]
    assert stopped and stopped[0]["restart"] == 0, after["events"]
    # ... and it was stopped DURING training: after the first round began, before the last ended.
    from demo.federation import round_times

    rounds = round_times(server_log)
    assert rounds, server_log[-3000:]
    first_round, last_round = rounds[min(rounds)][0], rounds[max(rounds)][1]
    stopped_at = dt.datetime.strptime(stopped[0]["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert first_round - 1 <= stopped_at <= last_round, (first_round, stopped_at, last_round)
    restart = run(["scontrol", "show", "job", after["job_id"], "-o"], env=fed_env()).stdout
    assert "Restarts=1" in restart or "Restarts=2" in restart, restart
    log = _logs(fed, victim)
    # The role was stopped on the warning signal, not killed; the job requeued itself.
    assert "preemption or time limit ahead (preemption); stopping the role" in log
    assert "sending SIGTERM to the role" in log and "SIGKILL" not in log
    assert "requeued job" in log and ("DUE TO JOB REQUEUE" in log or "DUE TO PREEMPTION" in log)
    _assert_inside_container("hospital-a", forwards["hospital-a"])  # the restarted container too

    # Only through the tunnel, and the traffic is the training's: during the job every client
    # exchanged data with the hub, and what the clients received came from the server's peer
    # (the admin console alone cannot account for it).
    delta = {
        peer: {
            k: traffic_after[peer].get(k, 0) - traffic_before[peer].get(k, 0)
            for k in ("rx_bytes", "tx_bytes")
        }
        for peer in ("fl-server", "hospital-a", "hospital-b", "admin")
    }
    for client in ("hospital-a", "hospital-b"):
        assert delta[client]["rx_bytes"] > 20_000 and delta[client]["tx_bytes"] > 20_000, delta
    to_clients = delta["hospital-a"]["tx_bytes"] + delta["hospital-b"]["tx_bytes"]
    assert delta["fl-server"]["rx_bytes"] >= 0.9 * to_clients, delta

    # The rejoined client is a full member again: the next job trains with both clients.
    again = fed.run_training(timeout=300)
    assert again.get("status") == "FINISHED:COMPLETED", again
    assert again["job_id"] in _logs(fed, victim)


def fed_env():
    return {"SLURM_CONF": "/var/lib/hpcfed/testcluster/etc/slurm.conf"}


def _logs(fed, name):
    from demo.federation import hpcfed

    return hpcfed("logs", name, check=False).stdout


def _role_pid(role: str) -> int:
    """The NVFlare process of a role, found by its command line (server_train / uid=SITE)."""
    seen = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if "apptainer" in text or "nvflare.private.fed.app" not in text:
            continue
        seen.append(text)
        if role == "server" and "server_train" in text:
            return int(entry)
        if role != "server" and "client_train" in text and f"uid={role}" in text:
            return int(entry)
    pytest.fail(f"no running NVFlare process for {role}: {seen}")


def _assert_inside_container(role: str, forward):
    """/proc/PID/root is the role's own root file system (the image, with the binds the job made);
    /proc/PID/maps names the files its Python loaded, as the container sees them."""
    pid = _role_pid(role)
    hosts = Path(f"/proc/{pid}/root/etc/hosts").read_text()
    names = {
        line.split()[1]: line.split()[0]
        for line in hosts.splitlines()
        if len(line.split()) >= 2 and not line.startswith("#")
    }
    if forward is not None:
        assert names.get("fl-server") == forward, (role, hosts)
    else:
        assert "fl-server" not in names or names["fl-server"].startswith("127."), (role, hosts)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/opt/fl/venv/lib/" in maps, (role, "NVFlare's modules do not come from the image venv")
    assert Path(f"/proc/{pid}/root/opt/fl/venv/bin/python3").exists(), role
    assert not Path("/opt/fl/venv").exists(), "the host must not have the image's venv"
