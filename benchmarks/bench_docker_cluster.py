"""The Docker test cluster: up time from built images, node loss → job running again elsewhere,
network cut → tunnel carrying traffic again.

Run as root where `make test` has run (the images exist):
    /opt/hpcfed/venv/bin/python benchmarks/bench_docker_cluster.py [--runs 5] [--slurm 22.05]
Writes benchmarks/results/docker_cluster.md. Leaves the cluster down at the end.

- up: `testcluster down`, then `testcluster up --engine docker` with the images built: seven
  containers started, slurmdbd/slurmctld answering, all nodes idle.
- node loss: a job of hpcuser (submitted with hpcfed, no Slurm requeue) runs; its node's
  container is killed; `hpcfed rejoin` runs every 5 s from login1 (as a frequent cron would);
  measured: kill → the replacement job RUNNING on another node. Slurm's SlurmdTimeout (20 s
  here) is most of it.
- node loss in the NVFlare federation (tests/test_docker_federation.py's: dashboard, kits,
  tunnels through the hub, the server on node1, two clients on the other two nodes): a client's
  node is killed; `hpcfed rejoin` every 5 s from login1; measured: kill → the client's new job
  RUNNING on another node and the server logging that client as joined again (NVFlare's
  "New client NAME@"). Between runs the lost node is started again and, if both clients then
  share a node, one is moved back (cancel and submit again: Slurm's LLN picks the idle node).
- network cut: an echo server on node1 and a client on node2 through hpcfed's userspace tunnel
  (liveness 10 s), node2 disconnected from the "internet" network for CUT seconds; measured:
  reconnect → the first echo through the tunnel again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "tests"))
from docker_cluster import DockerLab  # noqa: E402
from test_docker_cluster_faults import ECHO_SERVER, _echo, _peer  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from hpcfed.testcluster.docker_cluster import DockerCluster  # noqa: E402
from hpcfed.testcluster.docker_spec import DockerClusterSpec  # noqa: E402

HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]


def _cli(*args: str) -> dict:
    proc = subprocess.run(HPCFED + list(args), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout) if "--json" in args else {}


def _until(predicate, timeout: float, interval: float = 0.5) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout} s")


def bench_up(slurm: str, runs: int) -> list:
    # Untimed: builds the images if this code has not been built yet (measured: from built ones).
    _cli("testcluster", "up", "--engine", "docker", "--slurm", slurm, "--json")
    wall = []
    for _ in range(runs):
        _cli("testcluster", "down", "--engine", "docker", "--slurm", slurm)
        t0 = time.monotonic()
        _cli("testcluster", "up", "--engine", "docker", "--slurm", slurm, "--json")
        wall.append(time.monotonic() - t0)
    return wall


def _state(lab: DockerLab, env: dict, name: str) -> dict:
    out = lab.hpcfed("login1", "status", name, "--json", env=env).stdout
    return json.loads(out)["deployments"][0]


def _one_node_loss(lab: DockerLab) -> float:
    env = dict(lab.state_env(), HPCFED_SITE__PREEMPTION__REQUEUE="false")
    name = f"bn-{uuid.uuid4().hex[:6]}"
    sub = lab.hpcfed(
        "login1", "submit", "client", "--site", "local", "--gpus", "0", "--name", name,
        "--command", "sleep 3600", "--json", env=env,
    )  # fmt: skip
    first = json.loads(sub.stdout)["job_id"]
    _until(lambda: _state(lab, env, name)["job_state"] == "RUNNING", 120)
    lost = _state(lab, env, name)["node"]
    t0 = time.monotonic()
    subprocess.run(["docker", "kill", lab.spec.container(lost)], check=True, capture_output=True)

    def back() -> bool:
        lab.hpcfed("login1", "rejoin", env=env)
        d = _state(lab, env, name)
        return d["job_id"] != first and d["job_state"] == "RUNNING"

    _until(back, 300, 5)
    took = time.monotonic() - t0
    lab.hpcfed("login1", "cancel", name, env=env)
    subprocess.run(["docker", "start", lab.spec.container(lost)], check=True, capture_output=True)
    lab.cluster.wait_ready([lost])
    lab.cluster.wait_nodes_idle()
    return took


def bench_node_loss(lab: DockerLab, runs: int) -> list:
    return [_one_node_loss(lab) for _ in range(runs)]


def bench_federation_node_loss(lab: DockerLab, runs: int) -> list:
    import test_docker_federation as tf

    _cli("testcluster", "up", "--json")  # the native cluster's user builds the NVFlare images
    fed = tf.start_federation(lab)
    try:
        return [_one_federation_node_loss(tf, fed) for _ in range(runs)]
    finally:
        tf.stop_federation(fed)


def _one_federation_node_loss(tf, fed) -> float:
    lab = fed.lab
    _one_client_per_node(tf, fed)
    victim = sorted(tf.SITES)[-1]
    before = fed.status(victim)
    mark = f"New client {victim}@"
    joined = fed.logs(tf.SERVER).count(mark)
    t0 = time.monotonic()
    subprocess.run(["docker", "kill", lab.spec.container(before["node"])], check=True)

    def back() -> bool:
        fed.hpcfed("rejoin", host="login1", check=False)  # exit 4 while Slurm cannot tell
        d = fed.status(victim)
        if d["job_id"] == before["job_id"] or d["job_state"] != "RUNNING":
            return False
        return fed.logs(tf.SERVER).count(mark) > joined

    _until(back, 600, 5)
    took = time.monotonic() - t0
    subprocess.run(["docker", "start", lab.spec.container(before["node"])], check=True)
    lab.cluster.wait_ready([before["node"]])
    lab.cluster.wait_nodes_idle()
    return took


def _one_client_per_node(tf, fed) -> None:
    """After a loss both clients may run on the one node left: move one back, and wait until
    the server has both."""
    nodes = {site: fed.status(site)["node"] for site in tf.SITES}
    if len(set(nodes.values())) < len(nodes):
        site = sorted(tf.SITES)[-1]
        joined = fed.logs(tf.SERVER).count(f"New client {site}@")
        fed.hpcfed("cancel", fed.deployments[site])
        tf.submit_client(fed, site, fed.deployments[site])
        _until(lambda: fed.logs(tf.SERVER).count(f"New client {site}@") > joined, 300, 3)
    _until(lambda: tf._all_running(fed), 300, 3)


def bench_network_cut(lab: DockerLab, runs: int, cut: float) -> list:
    tag = uuid.uuid4().hex[:6]
    home = f"/home/{lab.user}/.t/bench-{tag}"
    lab.cluster.exec("login1", ["install", "-d", "-o", lab.user, "-m", "0700", home])
    server, srv_ip = _peer(lab, "server", f"bsrv{tag}", home)
    client, _ = _peer(lab, "client", f"bcli{tag}", home)
    lab.cluster.exec(
        "login1", ["bash", "-c", f"cat > {home}/echo.py"], user=lab.user, input=ECHO_SERVER
    )
    jobs = []
    for node, script in (
        ("node1", f"python3 {home}/echo.py & exec hpcfed tunnel up --config {server} "
                  f"-R 9000=127.0.0.1:9000 --liveness 10"),
        ("node2", f"exec hpcfed tunnel up --config {client} -L 127.0.0.1:9100={srv_ip}:9000 "
                  f"--liveness 10"),
    ):  # fmt: skip
        out = lab.sh(
            "login1", f"sbatch --parsable -w {node} -o {home}/{node}.out --wrap '{script}'",
            user=lab.user,
        )  # fmt: skip
        jobs.append(out.stdout.strip())
    _until(lambda: _echo(lab, "node2", "warm"), 120, 1)
    net = f"{lab.spec.project}_internet"
    times = []
    for _ in range(runs):
        subprocess.run(["docker", "network", "disconnect", net, lab.spec.container("node2")], check=True)  # fmt: skip
        time.sleep(cut)
        subprocess.run(
            ["docker", "network", "connect", "--ip", lab.spec.internet_ip("node2"), net,
             lab.spec.container("node2")],
            check=True,
        )  # fmt: skip
        times.append(_until(lambda: _echo(lab, "node2", "b"), 180, 0.5))
    lab.root("slurmctld", "scancel", *jobs)
    return times


def row(label: str, xs: list) -> str:
    return (
        f"| {label} | {len(xs)} | {statistics.median(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} "
        f"| {', '.join(f'{x:.1f}' for x in xs)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slurm", default="22.05", choices=["22.05", "24.11"])
    ap.add_argument("--cut", type=float, default=20.0, help="seconds the network stays cut")
    args = ap.parse_args()
    up = bench_up(args.slurm, args.runs)
    lab = DockerLab(DockerCluster(DockerClusterSpec(slurm=args.slurm)), {})
    loss = bench_node_loss(lab, args.runs)
    cut = bench_network_cut(lab, args.runs, args.cut)
    fed_loss = bench_federation_node_loss(lab, args.runs)
    _cli("testcluster", "down", "--engine", "docker", "--slurm", args.slurm)
    out = ROOT / "benchmarks" / "results" / "docker_cluster.md"
    out.write_text(
        f"# Docker test cluster (Slurm {args.slurm})\n\n"
        f"Measured {datetime.date.today()} on: {describe()}\n\n"
        "See the docstring of `benchmarks/bench_docker_cluster.py` for what each row measures.\n\n"
        "| what | runs | median s | min | max | raw |\n|---|---|---|---|---|---|\n"
        + row("up from built images (7 containers, nodes idle)", up)
        + "\n"
        + row("node killed → replacement job RUNNING elsewhere (rejoin every 5 s)", loss)
        + "\n"
        + row(f"network cut {args.cut:.0f} s → reconnect → echo through the tunnel", cut)
        + "\n"
        + row(
            "NVFlare client's node killed → client back in the federation (rejoin every 5 s)",
            fed_loss,
        )
        + "\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
