"""Faults real clusters have, on the Docker test cluster: a compute node lost, the controller
stopped for a minute, a node's network cut for a minute, the hub restarted.

The roles are simple stand-ins (a sleeping job; a TCP echo server and a client through hpcfed's
userspace WireGuard tunnel), not the NVFlare federation: what is tested is what Slurm, hpcfed
rejoin and the tunnel do when the fault happens."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
from docker_cluster import wait_for
from test_docker_cluster import _active_jobs, _submit, _wait_state, unique

# One release is enough for the faults (they test Slurm's and hpcfed's reactions, which the
# release does not change); both releases would add ~6 minutes to `make test`.
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slurm,
    pytest.mark.docker_releases("22.05"),
]


@pytest.mark.timeout(600)
def test_node_loss_ends_node_fail_and_rejoin_resubmits_on_another_node(docker_lab):
    lab = docker_lab
    # No Slurm requeue: the loss is hpcfed rejoin's to handle (as on sites without JobRequeue).
    env = dict(lab.state_env(), HPCFED_SITE__PREEMPTION__REQUEUE="false")
    name = unique("loss")
    job_id = _submit(lab, env, name)["job_id"]
    lost = _wait_state(lab, env, name, {"RUNNING"})["node"]
    assert lab.cluster.container_state(lost) == "running"

    subprocess.run(["docker", "kill", lab.spec.container(lost)], check=True, capture_output=True)
    try:
        # Slurm notices after SlurmdTimeout and ends the job NODE_FAIL.
        dep = _wait_state(lab, env, name, {"NODE_FAIL"}, timeout=180, host="login2")
        assert dep["job_id"] == job_id
        proc = lab.hpcfed("login2", "rejoin", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["deployments"][0]["action"] == "resubmitted"
        dep = _wait_state(lab, env, name, {"RUNNING"}, timeout=120)
        assert dep["job_id"] != job_id and dep["node"] != lost, dep
        assert [j["job_id"] for j in dep["jobs"]] == [job_id, dep["job_id"]]
        # a second rejoin leaves the running replacement alone
        again = lab.hpcfed("login1", "rejoin", "--json", env=env)
        assert json.loads(again.stdout)["deployments"][0]["action"] == "ok"
    finally:
        subprocess.run(["docker", "start", lab.spec.container(lost)], capture_output=True)
        lab.cluster.wait_ready([lost])
        lab.cluster.wait_nodes_idle()
    assert lab.hpcfed("login1", "cancel", name, env=env).returncode == 0


@pytest.mark.timeout(600)
def test_controller_stopped_a_minute_nothing_gone_nothing_resubmitted(docker_lab):
    lab = docker_lab
    env = lab.state_env()
    name = unique("ctl")
    job_id = _submit(lab, env, name)["job_id"]
    _wait_state(lab, env, name, {"RUNNING"})
    t0 = time.monotonic()
    subprocess.run(["docker", "stop", lab.spec.container("slurmctld")], check=True, capture_output=True)  # fmt: skip
    try:
        while time.monotonic() - t0 < 60:
            status = lab.hpcfed("login1", "status", name, "--json", env=env, timeout=180)
            dep = json.loads(status.stdout)["deployments"][0]
            assert dep["job_state"] == "UNKNOWN", dep  # unknown, never "gone"
            proc = lab.hpcfed("login2", "rejoin", "--json", env=env, timeout=180)
            assert proc.returncode == 4, proc.stderr  # scheduler unreachable
            assert json.loads(proc.stdout)["deployments"][0]["action"] == "unknown"
            time.sleep(5)
    finally:
        subprocess.run(["docker", "start", lab.spec.container("slurmctld")], capture_output=True)
        lab.cluster.wait_ready(["slurmctld"])
    dep = _wait_state(lab, env, name, {"RUNNING"}, timeout=120)
    assert dep["job_id"] == job_id and [j["job_id"] for j in dep["jobs"]] == [job_id]
    proc = lab.hpcfed("login1", "rejoin", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["deployments"][0]["action"] == "ok"
    assert [j[0] for j in _active_jobs(lab, name)] == [job_id]
    assert lab.hpcfed("login1", "cancel", name, env=env).returncode == 0


# ---- the tunnel: an echo server on one node, a client on another, only through the hub

ECHO_SERVER = (
    "import socket,threading\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('127.0.0.1',9000));s.listen()\n"
    "def h(c):\n"
    "    with c:\n"
    "        while (d:=c.recv(4096)): c.sendall(d)\n"
    "while True: threading.Thread(target=h,args=(s.accept()[0],),daemon=True).start()\n"
)
ECHO_CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection(('127.0.0.1',9100),timeout=5)\n"
    "c.sendall(b'ping-'+sys.argv[1].encode());print(c.recv(100).decode())\n"
)


def _peer(lab, kind: str, peer: str, home: str) -> tuple[str, str]:
    """A tunnel config for `peer`: made on the hub, key pair made at the site, key registered."""
    conf = f"{home}/{peer}.conf"
    gen = lab.root(
        "hub", "hpcfed", "hub", "genconf", kind, peer, "--dir", "/etc/hpcfed/hub", "--json"
    )
    assert gen.returncode == 0, gen.stderr
    made = json.loads(gen.stdout)
    text = lab.root("hub", "cat", made["config"]).stdout
    # The config holds a PSK: written 0600 by the user, never on a command line.
    w = lab.cluster.exec(
        "login1", ["bash", "-c", f"umask 077; cat > {conf}"], user=lab.user, input=text
    )
    assert w.returncode == 0, w.stderr
    key = lab.hpcfed("login1", "vpn", "keygen", "--config", conf, "--json")
    assert key.returncode == 0, key.stderr
    pub = json.loads(key.stdout)["public_key"]
    add = lab.root("hub", "hpcfed", "hub", "add", kind, peer, pub, "--dir", "/etc/hpcfed/hub")
    assert add.returncode == 0, add.stderr
    return conf, made["address"].split("/")[0]


def _echo(lab, node: str, token: str) -> bool:
    proc = lab.cluster.exec(node, ["python3", "-c", ECHO_CLIENT, token], user=lab.user, timeout=30)
    return proc.stdout.strip() == f"ping-{token}"


def _tunnel_state(lab, node: str, status_file: str) -> str:
    out = lab.cluster.exec(node, ["cat", status_file], user=lab.user).stdout
    try:
        return str(json.loads(out).get("state"))
    except ValueError:
        return "unreadable"


def _handshakes(lab, node: str, status_file: str) -> int:
    out = lab.cluster.exec(node, ["cat", status_file], user=lab.user).stdout
    try:
        return int(json.loads(out).get("handshakes", 0))
    except ValueError:
        return 0


@pytest.fixture()
def echo_through_tunnel(docker_lab):
    """Server on node1 (-R), client on node2 (-L), both as Slurm jobs of the cluster user."""
    lab = docker_lab
    tag = uuid.uuid4().hex[:6]
    home = f"/home/{lab.user}/.t/tun-{tag}"
    lab.cluster.exec("login1", ["install", "-d", "-o", lab.user, "-m", "0700", home])
    server, srv_ip = _peer(lab, "server", f"srv{tag}", home)
    client, _ = _peer(lab, "client", f"cli{tag}", home)
    lab.cluster.exec(
        "login1", ["bash", "-c", f"cat > {home}/echo.py"], user=lab.user, input=ECHO_SERVER
    )
    jobs = []
    for node, script in (
        ("node1", f"python3 {home}/echo.py & exec hpcfed tunnel up --config {server} "
                  f"-R 9000=127.0.0.1:9000 --liveness 10 --status-file {home}/srv.status"),
        ("node2", f"exec hpcfed tunnel up --config {client} -L 127.0.0.1:9100={srv_ip}:9000 "
                  f"--liveness 10 --status-file {home}/cli.status"),
    ):  # fmt: skip
        proc = lab.sh(
            "login1",
            f"sbatch --parsable -w {node} -J tun-{tag} -o {home}/{node}.out --wrap '{script}'",
            user=lab.user,
        )
        assert proc.returncode == 0, proc.stderr
        jobs.append(proc.stdout.strip())
    wait_for("an echo through the tunnel", lambda: _echo(lab, "node2", "first"), 90, 2)
    yield {"lab": lab, "home": home, "jobs": jobs}
    lab.root("slurmctld", "scancel", *jobs)


@pytest.mark.timeout(600)
def test_network_cut_a_minute_then_the_tunnel_handshakes_again(echo_through_tunnel):
    t = echo_through_tunnel
    lab, home = t["lab"], t["home"]
    before = _handshakes(lab, "node2", f"{home}/cli.status")
    net = f"{lab.spec.project}_internet"
    subprocess.run(["docker", "network", "disconnect", net, lab.spec.container("node2")], check=True)  # fmt: skip
    try:
        time.sleep(5)
        assert not _echo(lab, "node2", "cut")  # really cut
        time.sleep(55)
    finally:
        subprocess.run(
            ["docker", "network", "connect", "--ip", lab.spec.internet_ip("node2"), net,
             lab.spec.container("node2")],
            check=True,
        )  # fmt: skip
    # Traffic flows again through the same tunnel process (the job still runs): by a new
    # handshake, or on the old WireGuard session when it is still valid (< 180 s).
    wait_for("an echo after the cut", lambda: _echo(lab, "node2", "back"), 120, 2)
    assert _tunnel_state(lab, "node2", f"{home}/cli.status") == "up"
    assert _handshakes(lab, "node2", f"{home}/cli.status") >= before
    states = lab.root("slurmctld", "squeue", "-h", "-j", ",".join(t["jobs"]), "-o", "%T").stdout
    assert states.split() == ["RUNNING", "RUNNING"], states


@pytest.mark.timeout(600)
def test_hub_restart_tunnels_recover_without_resubmission(echo_through_tunnel):
    t = echo_through_tunnel
    lab, home = t["lab"], t["home"]
    before = {
        n: _handshakes(lab, n, f"{home}/{s}.status")
        for n, s in (("node1", "srv"), ("node2", "cli"))
    }
    subprocess.run(["docker", "restart", "-t", "5", lab.spec.container("hub")], check=True)
    lab.cluster.wait_ready(["hub"])
    wait_for("an echo after the hub restart", lambda: _echo(lab, "node2", "hub"), 120, 2)

    def handshaken_again():
        after = {
            n: _handshakes(lab, n, f"{home}/{s}.status")
            for n, s in (("node1", "srv"), ("node2", "cli"))
        }
        return all(after[n] > before[n] for n in after) and after

    # Both peers made a new handshake with the restarted hub (the status file is rewritten
    # every second, so the echo may come through before the file says so).
    wait_for(f"new handshakes on both peers (before: {before})", handshaken_again, 30, 1)
    # the same two jobs, never resubmitted
    states = lab.root("slurmctld", "squeue", "-h", "-j", ",".join(t["jobs"]), "-o", "%T").stdout
    assert states.split() == ["RUNNING", "RUNNING"], states
