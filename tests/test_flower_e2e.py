"""Flower end to end on real parts: the test cluster's Slurm, Apptainer images built by
`hpcfed image build`, hpcfed's own Flower credentials (CA, server certificate, site keys made at
the sites and registered by the operator), a wireguard-go hub in a network namespace and the
userspace tunnel - driven by the same code as `make demo FRAMEWORK=flower` (demo/flower.py).

The SuperLink listens on another port than the federation's (19093, not 9093) and every role
finds `fl-server` only through its container's /etc/hosts, which points at its tunnel forward:
a SuperNode or operator that bypassed the hub would not reach it. The GPUs are Slurm's (gres on
the test cluster's nodes), not real ones: no GPU exists here.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import need, run

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # demo/ only: hpcfed itself comes from the installed package

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.apptainer, pytest.mark.wireguard]
SLURM_ENV = {"SLURM_CONF": "/var/lib/hpcfed/testcluster/etc/slurm.conf"}


def _status(name):
    from demo.flower import hpcfed_json

    return hpcfed_json("status", name)["deployments"][0]


def _log(fed, name):
    from demo.flower import hpcfed

    return hpcfed("logs", name, check=False).stdout


def _runtime_port(log: str) -> int:
    line = [l for l in log.splitlines() if "local ports: runtime" in l][-1]
    return int(line.rsplit(" ", 1)[-1])


@pytest.fixture(scope="module")
def flower(slurm_cluster):
    for tool in ("apptainer", "wireguard-go", "wg"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/bootstrap)")
    need(
        Path("/var/cache/hpcfed/base-bookworm.sif").exists(),
        "the offline base image (30-apptainer.sh)",
    )
    from demo import flower as demo

    if demo.STATE_DIR.exists() or demo.demo_root().exists():
        demo.FlowerFederation().down()
    fed = demo.FlowerFederation(demo.State())
    try:
        fed.prepare()
        fed.node_ids = fed.launch()
        yield fed
    finally:
        for name in fed.state.deployments:
            print(f"----- hpcfed logs {name}")
            print(_log(fed, name)[-4000:])
        fed.down()


@pytest.mark.timeout(600)
def test_the_app_runs_through_the_hub_with_the_exact_result(flower):
    from demo.flower import EXPECTED_ROUNDS, SITES

    result, run_id, output = flower.run_app()
    assert result == {"rounds": EXPECTED_ROUNDS, "weights": [float(EXPECTED_ROUNDS)] * 4}, output
    runs = {str(r.get("run-id")): r for r in flower.runs()}
    assert runs[run_id]["status"] == "finished:completed", runs
    online = {int(n["node-id"]) for n in flower.nodes() if n.get("status") == "online"}
    assert set(flower.node_ids.values()) <= online
    # Every role met the SuperLink only at its tunnel forward.
    link = _log(flower, "flwr-superlink")
    assert "-R 9093=127.0.0.1:19093" in link and "--port 19093" in link
    for i, site in enumerate(SITES, start=1):
        log = _log(flower, f"flwr-{site}")
        assert f"container /etc/hosts: fl-server -> 127.0.{10 + i}.1" in log
        assert "--superlink fl-server:9093" in log


@pytest.mark.timeout(600)
def test_two_supernodes_on_one_node_do_not_collide(flower):
    site = "hospital-c"
    node_id = flower.register(site)
    name = flower.submit_supernode(site, 13)
    flower.wait_running([name])
    flower.wait_online(list(flower.node_ids.values()) + [node_id])
    b, c = _status("flwr-hospital-b"), _status(name)
    assert b["node"] == c["node"], (b, c)
    assert _runtime_port(_log(flower, "flwr-hospital-b")) != _runtime_port(_log(flower, name))
    from demo.flower import hpcfed

    hpcfed("cancel", name)


@pytest.mark.timeout(600)
def test_an_unregistered_supernode_never_comes_online_and_the_log_says_why(flower):
    name = flower.submit_supernode("hospital-x", 14)
    deadline = time.monotonic() + 400
    while _status(name).get("job_state") in ("PENDING", "RUNNING", "CONFIGURING"):
        assert time.monotonic() < deadline, _status(name)
        time.sleep(3)
    log = _log(flower, name)
    why = [l for l in log.splitlines() if l.startswith("[hpcfed-job") and "role ended" in l]
    # Flower's own 305 is named; the job's exit code is the table's (305 would reach Slurm as 49).
    assert why and why[-1].endswith(
        "role ended: exit code 12 (role-refused: the SuperLink refused to activate this "
        "SuperNode: its public key is not registered (the operator runs `hpcfed kit flower "
        "register`); flower exit code 305)"
    ), log[-3000:]
    job_id = _status(name)["job_id"]
    shown = run(["scontrol", "show", "job", job_id, "-o"], env=SLURM_ENV).stdout
    assert " ExitCode=12:0 " in shown, shown
    names = {n.get("name") for n in flower.nodes() if n.get("status") == "online"}
    assert "hospital-x" not in names


@pytest.mark.timeout(900)
def test_a_preempted_supernode_comes_back_with_its_node_id_and_the_run_completes(flower):
    victim = "flwr-hospital-a"
    before = _status(victim)
    lines, result = [], {}
    runner = threading.Thread(
        target=lambda: result.update(
            zip(
                ("result", "run_id", "output"),
                flower.run_app(rounds=6, round_seconds=6, on_line=lines.append),
            )
        )
    )
    runner.start()
    deadline = time.monotonic() + 240
    while not any("[ROUND 2/" in l for l in lines):
        assert time.monotonic() < deadline and runner.is_alive(), "".join(lines)[-3000:]
        time.sleep(1)
    high = run(
        ["sbatch", "--parsable", "-p", "high", "-w", before["node"], "--gres=gpu:a40:4",
         "--chdir=/tmp", "-o", "/dev/null", "--wrap", "sleep 15"],
        env=SLURM_ENV,
    )  # fmt: skip
    assert high.returncode == 0, high.stderr
    runner.join(timeout=800)
    assert not runner.is_alive(), "the run did not end"
    assert result["result"] == {"rounds": 6, "weights": [6.0] * 4}, result["output"][-3000:]
    after = _status(victim)
    assert after["job_id"] == before["job_id"] and after["job_state"] == "RUNNING"
    log = _log(flower, victim)
    assert "preemption or time limit ahead (preemption); stopping the role" in log
    assert "requeued job" in log
    restarts = run(["scontrol", "show", "job", after["job_id"], "-o"], env=SLURM_ENV).stdout
    assert "Restarts=0" not in restarts, restarts
    # The same key: the same node id, online again.
    node_id = flower.node_ids["hospital-a"]
    flower.wait_online([node_id])
