"""The Docker test cluster (`hpcfed testcluster up --engine docker`), for Slurm 22.05 (Debian 12)
and 24.11 (Debian 13): one container per host, compute nodes that reach nothing but UDP to the
hub's WireGuard port, two login nodes on one /home, and hpcfed used from the login nodes the way
users use it. The GPUs are fake (character devices): there is no GPU here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import pytest
from docker_cluster import wait_for
from helpers import hpcfed, need

pytestmark = [pytest.mark.docker, pytest.mark.slurm]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# ---- the cluster itself


@pytest.mark.timeout(3600)
def test_status_shows_engine_hosts_and_networks(docker_lab):
    env = {"HPCFED_TESTCLUSTER_ENGINE": "docker"}
    proc = hpcfed("testcluster", "status", "--slurm", docker_lab.slurm, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["engine"] == "docker" and info["up"] is True
    hosts = {h["host"]: h for h in info["hosts"]}
    assert set(hosts) == {"slurmctld", "node1", "node2", "node3", "login1", "login2", "hub"}
    assert all(h["state"] == "running" for h in hosts.values())
    assert {n["name"].split("_")[-1] for n in info["networks"]} == {"cluster", "internet"}
    assert info["nodes"] == {"node1": "idle", "node2": "idle", "node3": "idle"}
    # the human form names the same things
    text = hpcfed("testcluster", "status", "--slurm", docker_lab.slurm, env=env).stdout
    assert "UP" in text and "login2" in text and "internet" in text


def test_each_host_is_its_own_machine_with_the_expected_slurm(docker_lab):
    names = {
        h: docker_lab.root(h, "hostname").stdout.strip() for h in ("slurmctld", "node2", "login1")
    }
    assert names == {"slurmctld": "slurmctld", "node2": "node2", "login1": "login1"}
    version = docker_lab.sh("login1", "sinfo --version", user=docker_lab.user).stdout
    assert version.split()[1].startswith(docker_lab.slurm), version
    # typed fake GPUs on every node, as a real site would show them
    gres = docker_lab.sh("login1", "sinfo -h -N -o '%N %G'", user=docker_lab.user).stdout
    assert sorted(gres.split("\n")[:3]) == [f"node{i} gpu:a40:4" for i in (1, 2, 3)] or all(
        "gpu:a40:4" in line for line in gres.splitlines()
    ), gres


def test_login_nodes_share_home(docker_lab):
    token = uuid.uuid4().hex
    path = f"/home/{docker_lab.user}/shared-{token}"
    assert docker_lab.sh("login1", f"echo {token} > {path}", user=docker_lab.user).returncode == 0
    assert docker_lab.sh("login2", f"cat {path}", user=docker_lab.user).stdout.strip() == token
    assert docker_lab.sh("node3", f"cat {path}").stdout.strip() == token
    docker_lab.sh("login2", f"rm -f {path}", user=docker_lab.user)


@pytest.mark.parametrize("host", ["node1", "login2"])
def test_apptainer_runs_a_contained_image_as_the_user(docker_lab, host):
    """As hpcfed runs roles (compute nodes) and admin consoles (login nodes): --containall,
    which needs FUSE, user and PID namespaces and a fresh /proc inside the container."""
    base = "/var/cache/hpcfed/base-bookworm.sif"  # scripts/bootstrap.d/30-apptainer.sh
    need(os.path.exists(base), "the offline base image (30-apptainer.sh)")
    sif = f"/tmp/base-{uuid.uuid4().hex[:6]}.sif"
    subprocess.run(["docker", "cp", base, f"{docker_lab.spec.container(host)}:{sif}"], check=True)
    docker_lab.root(host, "chmod", "0644", sif)
    try:
        inner = "readlink /proc/self/ns/pid; grep ^VERSION_CODENAME= /etc/os-release"
        proc = docker_lab.sh(
            host,
            f"apptainer exec --containall --cleanenv {sif} sh -c '{inner}'",
            user=docker_lab.user,
        )
        assert proc.returncode == 0, proc.stderr
        pidns, codename = proc.stdout.split()[-2:]
        assert codename == "VERSION_CODENAME=bookworm", proc.stdout
        # Its own PID namespace, with its own /proc: not the node's.
        assert pidns != docker_lab.sh(host, "readlink /proc/self/ns/pid").stdout.strip(), pidns
    finally:
        docker_lab.root(host, "rm", "-f", sif)


# ---- the network: compute nodes reach nothing but UDP to the hub's WireGuard port


def _tcp(lab, src: str, ip: str, port: int) -> bool:
    """Did a TCP connection from src to ip:port succeed?"""
    return lab.sh(src, f"nc -z -w 3 {ip} {port}", timeout=30).returncode == 0


def _udp_seen_by_hub(lab, src: str, port: int) -> int:
    """Send one UDP datagram from src to hub:port; how many the hub's firewall counted from it."""
    src_ip = lab.spec.internet_ip(src)
    chain = f"seen{uuid.uuid4().hex[:6]}"
    lab.root("hub", "iptables", "-N", chain)
    lab.root("hub", "iptables", "-I", "INPUT", "-p", "udp", "-s", src_ip, "--dport", str(port), "-j", chain)  # fmt: skip
    try:
        lab.sh(src, f"echo probe | nc -u -w 1 {lab.spec.hub_ip} {port}", timeout=30)
        time.sleep(0.5)
        out = lab.root("hub", "iptables", "-L", "INPUT", "-v", "-x", "-n").stdout
        line = next(x for x in out.splitlines() if chain in x)
        return int(line.split()[0])
    finally:
        lab.root("hub", "iptables", "-D", "INPUT", "-p", "udp", "-s", src_ip, "--dport", str(port), "-j", chain)  # fmt: skip
        lab.root("hub", "iptables", "-X", chain)


@pytest.mark.timeout(600)
def test_compute_nodes_reach_only_the_hubs_wireguard_port(docker_lab):
    lab, spec = docker_lab, docker_lab.spec
    # A TCP service on node2 and one on the hub; login nodes (no firewall) prove they answer.
    for host in ("node2", "hub"):
        lab.sh(host, "nohup nc -lk 9000 >/dev/null 2>&1 &")
    wait_for("node2's TCP service", lambda: _tcp(lab, "login1", spec.cluster_ip("node2"), 9000), 30)
    assert _tcp(lab, "login1", spec.hub_ip, 9000)

    # From a compute node: TCP to the hub fails, to another node fails, to a login node fails.
    assert not _tcp(lab, "node1", spec.hub_ip, 9000)
    assert not _tcp(lab, "node1", spec.cluster_ip("node2"), 9000)
    assert not _tcp(lab, "node1", spec.internet_ip("node2"), 9000)
    assert not _tcp(lab, "node1", spec.internet_ip("login1"), 22)
    assert _tcp(lab, "login2", spec.internet_ip("login1"), 22)  # sshd is there
    # ... and the same for a Slurm job's processes on that node (same network namespace).
    probe = f"nc -z -w 3 {spec.hub_ip} 9000 && echo OPEN || echo BLOCKED"
    out = f"/home/{lab.user}/probe-{uuid.uuid4().hex[:6]}.out"
    job = lab.sh(
        "login1",
        f"sbatch --wait -w node1 -t 1 -o {out} --wrap '{probe}' >/dev/null && cat {out}",
        user=lab.user,
        timeout=120,
    )
    assert job.stdout.strip() == "BLOCKED", (job.stdout, job.stderr)
    # UDP: the hub's WireGuard port gets through, any other port does not.
    assert _udp_seen_by_hub(lab, "node1", spec.wireguard_port) >= 1
    assert _udp_seen_by_hub(lab, "node1", spec.wireguard_port + 1) == 0
    assert _udp_seen_by_hub(lab, "login1", spec.wireguard_port + 1) >= 1  # the probe itself works
    # Both networks are internal (Docker neither routes nor NATs them off the machine).
    for net in ("cluster", "internet"):
        internal = subprocess.run(
            ["docker", "network", "inspect", "-f", "{{.Internal}}", f"{spec.project}_{net}"],
            capture_output=True,
            text=True,
        )
        assert internal.stdout.strip() == "true", (net, internal.stderr)


# ---- hpcfed from the login nodes


def _submit(lab, env, name, command="sleep 600", gpus="0", host="login1", extra=()):
    proc = lab.hpcfed(
        host,
        "submit", "client", "--site", "local", "--gpus", gpus, "--name", name,
        "--command", command, "--json", *extra,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _status(lab, env, name, host="login1"):
    proc = lab.hpcfed(host, "status", name, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["deployments"][0]


def _wait_state(lab, env, name, states, timeout=120, host="login1"):
    return wait_for(
        f"{name} in {states}",
        lambda: (d := _status(lab, env, name, host))["job_state"] in states and d,
        timeout,
    )


@pytest.mark.timeout(600)
def test_submit_status_logs_cancel_across_login_nodes(docker_lab):
    lab = docker_lab
    env = lab.state_env()
    name = unique("dk")
    cmd = 'echo "GPUS=$CUDA_VISIBLE_DEVICES ON=$(hostname)"; sleep 600'
    job_id = _submit(lab, env, name, cmd, gpus="2")["job_id"]
    dep = _wait_state(lab, env, name, {"RUNNING"})
    assert dep["job_id"] == job_id and re.fullmatch(r"node[1-3]", dep["node"]), dep
    # the other login node sees the same deployment (shared /home) and the same job
    other = _status(lab, env, name, host="login2")
    assert other["job_id"] == job_id and other["job_state"] == "RUNNING"
    # Wait for the line the role printed, not for the command text: the log also holds the
    # role's command line, which contains "GPUS=" before the role has run it.
    line = wait_for(
        "the role's output",
        lambda: next(
            (
                x
                for x in lab.hpcfed("login2", "logs", name, env=env).stdout.splitlines()
                if x.startswith("GPUS=")
            ),
            None,
        ),
        60,
    )
    assert len(line.split()[0].split("=")[1].split(",")) == 2 and f"ON={dep['node']}" in line
    proc = lab.hpcfed("login2", "cancel", name, env=env)
    assert proc.returncode == 0, proc.stderr
    dep = _wait_state(lab, env, name, {"CANCELLED", "COMPLETED", "FAILED"})
    assert dep["state"] == "STOPPED" and dep["stopped"] is True
    squeue = lab.sh("login1", f"squeue -h -j {job_id} -o %T", user=lab.user).stdout.strip()
    assert squeue in ("", "CANCELLED", "COMPLETING", "COMPLETED"), squeue


def _admin_cancel(lab, job_id):
    assert lab.root("slurmctld", "scancel", job_id).returncode == 0
    wait_for(
        f"job {job_id} gone from the queue",
        lambda: (
            not lab.root(
                "slurmctld",
                "squeue",
                "-h",
                "-j",
                job_id,
                "-t",
                "PENDING,RUNNING,COMPLETING",
                "-o",
                "%i",
            ).stdout.strip()
        ),
        60,
    )


def _active_jobs(lab, name):
    out = lab.root(
        "slurmctld", "squeue", "-h", f"--name=hpcfed-{name}", "-t", "PENDING,RUNNING,CONFIGURING",
        "-o", "%i %N",
    ).stdout  # fmt: skip
    return [tuple(x.split()) + ("",) * (2 - len(x.split())) for x in out.splitlines()]


@pytest.mark.timeout(600)
def test_rejoin_from_both_login_nodes_at_once_resubmits_exactly_once(docker_lab):
    lab = docker_lab
    env = lab.state_env()
    name = unique("rj")
    job_id = _submit(lab, env, name)["job_id"]
    _wait_state(lab, env, name, {"RUNNING"})
    _admin_cancel(lab, job_id)  # cancelled by someone else: Slurm does not requeue it
    # Both login nodes, several rejoins each, at the same moment (cron on both at :00).
    script = " & ".join(["hpcfed rejoin --json > $T/rejoin.$$.$RANDOM.json"] * 4) + "; wait"
    outdirs = {}
    procs = []

    for host in ("login1", "login2"):
        outdirs[host] = f"/tmp/rj-{uuid.uuid4().hex[:6]}"
        lab.root(host, "install", "-d", "-o", lab.user, outdirs[host])
        cmd = [
            "docker", "exec", "-e", f"T={outdirs[host]}", "-e", f"HOME=/home/{lab.user}",
            *sum((["-e", f"{k}={v}"] for k, v in env.items()), []),
            lab.spec.container(host), "runuser", "-u", lab.user, "--", "bash", "-c", script,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
    assert all(p.wait(timeout=240) == 0 for p in procs)
    actions = []
    for host, d in outdirs.items():
        out = lab.sh(host, f"cat {d}/*.json").stdout
        for doc in re.findall(r"\{.*?\n\}", out, re.S):
            actions.append(json.loads(doc)["deployments"][0]["action"])
    assert len(actions) == 8 and actions.count("resubmitted") == 1, actions
    jobs = _active_jobs(lab, name)
    assert len(jobs) == 1 and jobs[0][0] != job_id, jobs
    assert lab.hpcfed("login2", "cancel", name, env=env).returncode == 0


@pytest.mark.timeout(400)
def test_cron_install_uses_scrontab_where_slurm_ships_it(docker_lab):
    """24.11 (trixie) ships scrontab: the entry is a Slurm cron job that really runs rejoin.
    22.05 (Debian 12) does not: the login node's crontab is used instead."""
    lab = docker_lab
    env = lab.state_env()
    proc = lab.hpcfed("login1", "cron", "install", "--every", "1m", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    installed = json.loads(proc.stdout)
    log = installed["log_file"]
    if lab.slurm == "22.05":
        assert installed["kind"] == "crontab"
        assert lab.sh("login1", "command -v scrontab").returncode != 0
        shown = lab.sh("login1", "crontab -l", user=lab.user).stdout
        assert "hpcfed-rejoin" in shown and "rejoin --log-file" in shown
        assert lab.hpcfed("login1", "cron", "remove", env=env).returncode == 0
        return
    assert installed["kind"] == "scrontab"
    table = lab.sh("login1", "scrontab -l", user=lab.user).stdout
    assert "#SCRON --job-name=hpcfed-rejoin" in table and "\n* * * * * " in table, table
    # Slurm holds it as a cron job of the user ...
    queued = lab.sh("login2", "squeue -h --me -n hpcfed-rejoin -o '%i %T'", user=lab.user)
    assert queued.stdout.strip(), queued
    # ... and runs it within a minute: rejoin writes its result to the log file.
    wait_for(
        "the scrontab entry to run rejoin",
        lambda: lab.sh("login2", f"test -s {log}").returncode == 0,
        150,
        interval=3,
    )
    assert lab.hpcfed("login1", "cron", "remove", env=env).returncode == 0
    assert "hpcfed-rejoin" not in lab.sh("login1", "scrontab -l", user=lab.user).stdout
