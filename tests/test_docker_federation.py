"""The NVFlare federation on the Docker test cluster, where each host is its own machine.

The server and two clients run as Slurm jobs in Apptainer on different compute-node containers,
which reach nothing but UDP to the hub; the researcher works on the login nodes (kits pulled from
the federation's dashboard on the hub's side of the network, tunnel keys made there, `hpcfed
submit`, `hpcfed rejoin`), and the admin console runs in the client image on a login node,
through its own tunnel. Then the faults:

- node loss: a client's compute node is killed mid-training; Slurm ends its job NODE_FAIL,
  `hpcfed rejoin` from the other login node resubmits it on another node, the client is back in
  the federation and the next training job completes with both clients;
- hub restart: every tunnel recovers without resubmission and the next job completes;
- controller stop and network cut, together, mid-training: the training finishes, nothing is
  resubmitted, and the cut client trains in the next job.

The dashboard runs on the Docker host, bound to its address on the "internet" network (the hub's
side; the compute nodes' firewall rejects it). The same faults with stand-in roles (and a
scheduler-level view of them) are in test_docker_cluster_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from docker_cluster import wait_for
from helpers import need
from test_docker_cluster_faults import _peer

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # demo/ only: hpcfed itself comes from the installed package

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slurm,
    pytest.mark.apptainer,
    pytest.mark.nvflare,
    pytest.mark.wireguard,
    pytest.mark.e2e,
    pytest.mark.docker_releases("22.05"),
]

SERVER = "fl-server"
FL_PORT = 18002
SITES = {"hospital-a": "alice@hospital-a.test", "hospital-b": "bob@hospital-b.test"}
ADMIN = "admin@fed.test"


@dataclass
class DockerFederation:
    lab: object
    env: dict  # the researcher's own XDG directories on the shared /home
    base: str  # the researcher's folder for this federation on the shared /home
    images: dict  # role -> image path on the shared /home
    dashboard: object
    tunnel_ips: dict = field(default_factory=dict)
    public_keys: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)  # site -> deployment name

    def hpcfed(self, *args: str, host: str = "login1", timeout: float = 180, check=True):
        proc = self.lab.hpcfed(host, *args, env=self.env, timeout=timeout)
        if check:
            assert proc.returncode == 0, (args, proc.stderr[-2000:])
        return proc

    def status(self, site: str, host: str = "login1") -> dict:
        out = self.hpcfed("status", self.deployments[site], "--json", host=host).stdout
        return json.loads(out)["deployments"][0]

    def logs(self, site: str) -> str:
        return self.hpcfed("logs", self.deployments[site], host="login2", check=False).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        proc = self.lab.cluster.exec(
            "login1",
            ["bash", "-c", f"umask 077; cat > {path} && chmod {mode} {path}"],
            user=self.lab.user,
            input=text,
        )
        assert proc.returncode == 0, proc.stderr

    def hub_traffic(self) -> dict:
        """peer -> (rx, tx) bytes, from the hub's own WireGuard (`wg show all transfer`)."""
        out = self.lab.root("hub", "wg", "show", "all", "transfer").stdout
        by_key = {c[1]: (int(c[2]), int(c[3])) for c in (x.split() for x in out.splitlines())}
        return {peer: by_key.get(key, (0, 0)) for peer, key in self.public_keys.items()}

    def train(self, job: str, timeout: float = 600) -> dict:
        """Submit an NVFlare job through the admin kit from login1: the console runs in the
        client image, reaching the server only through its own tunnel. Returns the last event."""
        bind = "127.0.20.1"
        kit = json.loads(self.hpcfed("kit", "show", ADMIN, "--role", "admin", "--json").stdout)
        tag = uuid.uuid4().hex[:6]
        ready, hosts = f"{self.base}/admin-{tag}.ready", f"{self.base}/admin-{tag}.hosts"
        self.write(hosts, f"127.0.0.1 localhost\n{bind} {SERVER}\n")
        script = f"""
set -e
hpcfed tunnel up --config {self.base}/admin.conf --ready-file {ready} \\
    -L {bind}:{FL_PORT}={self.tunnel_ips[SERVER]}:{FL_PORT} > {self.base}/admin-{tag}.log 2>&1 &
tunnel=$!
trap 'kill $tunnel' EXIT
for _ in $(seq 300); do [ -e {ready} ] && break; sleep 0.2; done
apptainer exec --cleanenv --containall --bind {hosts}:/etc/hosts:ro \\
    --bind {kit["path"]}:/fl/admin:ro --bind {self.base}:/fl/demo {self.images["client"]} \\
    python3 /fl/demo/admin_job.py {ADMIN} /fl/admin /fl/demo/jobs/{job} {int(timeout)}
"""
        proc = self.lab.sh("login1", script, user=self.lab.user, env=self.env, timeout=timeout + 60)
        events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        done = [e for e in events if e.get("event") == "done"]
        assert done, (proc.stdout[-2000:], proc.stderr[-2000:])
        return done[-1]


def _nvflare_images() -> dict:
    """The NVFlare server and client images, built on this machine by `hpcfed image build`
    (the demo's cache: built once, reused by the e2e test and `make demo`)."""
    from demo import federation as demo

    need(os.path.exists(demo.BASE_SIF), "the offline base image (30-apptainer.sh)")
    demo.sh(["mkdir", "-p", *demo.user_env().values()], user=demo.USER)
    fed = demo.Federation(demo.State())
    fed.state.save = lambda: None  # type: ignore[method-assign]  # not the demo's own run
    return fed.images()


def _copy_images(lab, images: dict) -> dict:
    """Onto the cluster's shared /home, once per cluster (docker cp: no registry, no network)."""
    folder = f"/home/{lab.user}/nvflare-images"
    lab.root("login1", "install", "-d", "-o", lab.user, "-m", "0755", folder)
    copied = {}
    for role, path in images.items():
        dest = f"{folder}/{role}-{Path(path).name}"
        if lab.root("login1", "test", "-s", dest).returncode != 0:
            subprocess.run(
                ["docker", "cp", path, f"{lab.spec.container('login1')}:{dest}.part"],
                check=True,
                capture_output=True,
            )
            lab.root("login1", "chown", lab.user, f"{dest}.part")
            lab.root("login1", "mv", f"{dest}.part", dest)
        copied[role] = dest
    return copied


def _dashboard(lab):
    from nvflare_dashboard import start_dashboard

    dash = start_dashboard(host=lab.spec.internet_gateway_ip, tls=True)
    dash.setup_project("dockerfed", server=SERVER, fl_port=FL_PORT)
    for site, email in SITES.items():
        dash.add_user(email, org=site.replace("-", "_"))
        dash.add_site(email, site, gpus=1)
    dash.freeze()
    return dash


def _pull_kits(fed: DockerFederation) -> None:
    """On login1, from the dashboard across the "internet" network, over https (its certificate
    given to requests the standard way, REQUESTS_CA_BUNDLE); the password on stdin."""
    ca = f"{fed.base}/dashboard-ca.pem"
    fed.write(ca, Path(fed.dashboard.ca_file).read_text())
    pulls = [("server", SERVER, ADMIN, ["--as", "fed-server"])]
    pulls += [("client", site, email, []) for site, email in SITES.items()]
    pulls += [("admin", ADMIN, ADMIN, [])]
    passwords = dict(fed.dashboard.users, **{ADMIN: fed.dashboard.admin_password})
    for role, site, email, extra in pulls:
        argv = [
            "hpcfed", "kit", "pull", "--dashboard", fed.dashboard.url,
            "--user", email, "--role", role, "--site", site, *extra,
        ]  # fmt: skip
        script = (
            'IFS= read -r HPCFED_DASHBOARD_PASSWORD; export HPCFED_DASHBOARD_PASSWORD; exec "$@"'
        )
        proc = fed.lab.cluster.exec(
            "login1",
            ["bash", "-c", script, "pull", *argv],
            user=fed.lab.user,
            env=dict(fed.env, REQUESTS_CA_BUNDLE=ca),
            input=passwords[email] + "\n",
            timeout=180,
        )
        assert proc.returncode == 0, (role, site, proc.stderr[-2000:])


def _site_profiles(fed: DockerFederation) -> None:
    sites = f"{fed.env['XDG_CONFIG_HOME']}/hpcfed/sites"
    fed.lab.cluster.exec("login1", ["mkdir", "-p", sites], user=fed.lab.user)
    common = f"extends: local\nworkdir: {fed.base}/work\n"
    # The server on node1; the clients wherever Slurm puts them (LLN: the least loaded nodes).
    fed.write(f"{sites}/fed-server.yaml", common + 'extra_directives: ["--nodelist=node1"]\n')
    # No Slurm requeue for the clients: a lost node is `hpcfed rejoin`'s to handle (as on sites
    # without JobRequeue; with it, Slurm itself would requeue the job on NODE_FAIL).
    client = common + 'extra_directives: ["--exclude=node1"]\npreemption:\n  requeue: false\n'
    for site in SITES:
        fed.write(f"{sites}/{site}.yaml", client)


def _jobs(fed: DockerFederation) -> None:
    """The demo's job, as is (both clients, 3 rounds), and a longer one to lose a node in."""
    src = REPO / "demo" / "jobs" / "hello-numpy"
    for name, rounds, timeout in (("short", 3, 120), ("long", 8, 15)):
        for part in ("meta.json", "app/config/config_fed_server.json",
                     "app/config/config_fed_client.json"):  # fmt: skip
            text = (src / part).read_text()
            if part.endswith("server.json"):
                cfg = json.loads(text)
                cfg["workflows"][0]["args"].update(num_rounds=rounds, train_timeout=timeout)
                text = json.dumps(cfg)
            elif part.endswith("client.json") and name == "long":
                cfg = json.loads(text)
                cfg["executors"][0]["executor"]["args"]["sleep_time"] = 3
                text = json.dumps(cfg)
            path = f"{fed.base}/jobs/{name}/{part}"
            fed.lab.cluster.exec(
                "login1", ["mkdir", "-p", os.path.dirname(path)], user=fed.lab.user
            )
            fed.write(path, text)
    fed.write(f"{fed.base}/admin_job.py", (REPO / "demo" / "admin_job.py").read_text())


def _tunnels(fed: DockerFederation) -> None:
    peers = [("server", SERVER)] + [("client", s) for s in SITES] + [("client", "admin")]
    for kind, peer in peers:
        _, fed.tunnel_ips[peer] = _peer(fed.lab, kind, peer, fed.base)  # {base}/{peer}.conf
    listed = json.loads(
        fed.lab.root("hub", "hpcfed", "hub", "list", "--dir", "/etc/hpcfed/hub", "--json").stdout
    )
    fed.public_keys = {p["id"]: p["keys"][0] for p in listed if p["id"] in fed.tunnel_ips}


def _submit_roles(fed: DockerFederation, tag: str) -> None:
    server = f"fed-server-{tag}"
    fed.hpcfed(
        "submit", "server", "--site", "fed-server", "--name", server, "--gpus", "0",
        "--image", fed.images["server"], "--tunnel-config", f"{fed.base}/{SERVER}.conf",
        "-R", f"{FL_PORT}=127.0.0.1:{FL_PORT + 10000}",
    )  # fmt: skip
    fed.deployments[SERVER] = server
    for site in SITES:
        submit_client(fed, site, f"fed-{site}-{tag}")


def submit_client(fed: DockerFederation, site: str, name: str) -> None:
    """A client role of `site` (its own image, tunnel and profile), dialling the server."""
    fed.hpcfed(
        "submit", "client", "--site", site, "--name", name, "--gpus", "1",
        "--image", fed.images["client"], "--tunnel-config", f"{fed.base}/{site}.conf",
        "--server-ip", fed.tunnel_ips[SERVER],
    )  # fmt: skip
    fed.deployments[site] = name


def _all_running(fed: DockerFederation):
    """The nodes of the roles once every role's job runs, else None."""
    deps = [fed.status(site) for site in fed.deployments]
    return all(d["job_state"] == "RUNNING" for d in deps) and [d["node"] for d in deps]


def start_federation(lab) -> DockerFederation:
    """The dashboard, kits, tunnels, jobs and the three roles running on three compute nodes
    (also what benchmarks/bench_docker_cluster.py measures node loss with)."""
    images = _copy_images(lab, _nvflare_images())
    tag = uuid.uuid4().hex[:6]
    env = lab.state_env()
    base = f"/home/{lab.user}/fed-{tag}"
    lab.cluster.exec("login1", ["install", "-d", "-m", "0700", base], user=lab.user)
    fed = DockerFederation(lab, env, base, images, _dashboard(lab))
    try:
        _site_profiles(fed)
        _pull_kits(fed)
        _tunnels(fed)
        _jobs(fed)
        _submit_roles(fed, tag)
        nodes = wait_for("the server and both clients running", lambda: _all_running(fed), 240, 2)
        assert len(set(nodes)) == 3, nodes  # three hosts: nothing shared but the hub
    except BaseException:
        stop_federation(fed)
        raise
    return fed


def stop_federation(fed: DockerFederation) -> None:
    for site in fed.deployments:
        print(f"----- hpcfed logs {fed.deployments[site]}")
        print(fed.logs(site)[-4000:])
        fed.hpcfed("cancel", fed.deployments[site], check=False)
    fed.dashboard.stop()


@pytest.fixture(scope="module")
def docker_federation(docker_lab, slurm_cluster):
    for tool in ("apptainer", "docker"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/bootstrap)")
    fed = start_federation(docker_lab)
    try:
        yield fed
    finally:
        stop_federation(fed)


def _round_started(fed: DockerFederation, n: int) -> bool:
    return f"Round {n} started" in fed.logs(SERVER)


def _rejoin_log(fed: DockerFederation) -> list:
    log = f"{fed.env['XDG_STATE_HOME']}/hpcfed/rejoin.log"
    return fed.lab.sh("login2", f"cat {log} 2>/dev/null", user=fed.lab.user).stdout.splitlines()


# The first test also builds the NVFlare images on a fresh machine (the fixture).
@pytest.mark.timeout(2400)
def test_node_loss_mid_training_cron_rejoin_brings_the_client_back(docker_federation):
    """A client's node dies mid-training. Nobody runs anything by hand: `hpcfed cron install`
    on both login nodes (their own cron daemons, every minute, the shared home's state) finds
    the job NODE_FAIL and resubmits it once - one login node does, the other finds it done -
    on another node; the client is a full member again for the next training job."""
    fed, lab = docker_federation, docker_federation.lab
    victim = "hospital-b"
    before = fed.status(victim)
    lost = before["node"]
    for host in ("login1", "login2"):
        fed.hpcfed("cron", "install", "--crontab", "--every", "1m", host=host)
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(fed.train("long", timeout=600)))
    trainer.start()
    wait_for("the second round", lambda: _round_started(fed, 1), 240, 2)
    subprocess.run(["docker", "kill", lab.spec.container(lost)], check=True, capture_output=True)
    try:
        # Slurm notices after SlurmdTimeout and ends the job NODE_FAIL (no requeue for it);
        # cron's next minute resubmits it.
        back = wait_for(
            "cron's rejoin to bring the client back",
            lambda: (d := fed.status(victim))["job_id"] != before["job_id"]
            and d["job_state"] == "RUNNING" and d,
            420, 3,
        )  # fmt: skip
        assert back["node"] != lost, back
        dep = fed.deployments[victim]
        resubmitted = [x for x in _rejoin_log(fed) if f" {dep} resubmitted " in x]
        assert len(resubmitted) == 1, resubmitted
        # "<time> <login node> <name> resubmitted <new job> job <old job> NODE_FAIL"
        assert f" {back['job_id']} job {before['job_id']} NODE_FAIL" in resubmitted[0], resubmitted
        minute = resubmitted[0][:16]  # cron ran both login nodes' entries in this minute
        wait_for(
            "both login nodes' rejoin passes of that minute",
            lambda: {x.split()[1] for x in _rejoin_log(fed)
                     if x[:16] >= minute and "rejoin pass" in x} >= {"login1", "login2"},
            90, 2,
        )  # fmt: skip
        log = _rejoin_log(fed)
        assert sum(f" {dep} resubmitted " in x for x in log) == 1, log
        others = [x for x in log if " resubmitted " in x and f" {dep} " not in x]
        assert not others, log
        trainer.join(timeout=700)
        assert not trainer.is_alive(), "the training job did not end"
        # The training went on with the other client while one was lost.
        assert result.get("status", "").startswith("FINISHED"), result
        assert "Round 7 finished" in fed.logs(SERVER)
        # The resubmitted client is a full member again: the next job trains with both.
        traffic = fed.hub_traffic()
        again = fed.train("short", timeout=400)
        assert again.get("status") == "FINISHED:COMPLETED", again
        assert again["job_id"] in fed.logs(victim)
        after = fed.hub_traffic()
        for site in SITES:  # both clients exchanged the training's data through the hub
            assert after[site][0] - traffic[site][0] > 20_000, (site, traffic, after)
    finally:
        for host in ("login1", "login2"):
            fed.hpcfed("cron", "remove", host=host, check=False)
        subprocess.run(["docker", "start", lab.spec.container(lost)], capture_output=True)
        lab.cluster.wait_ready([lost])
        lab.cluster.wait_nodes_idle()  # the lost node answers again: back in service


@pytest.mark.timeout(900)
def test_hub_restart_every_tunnel_recovers_without_resubmission(docker_federation):
    fed, lab = docker_federation, docker_federation.lab
    jobs = {site: fed.status(site)["job_id"] for site in fed.deployments}
    subprocess.run(["docker", "restart", "-t", "5", lab.spec.container("hub")], check=True)
    lab.cluster.wait_ready(["hub"])
    done = fed.train("short", timeout=400)
    assert done.get("status") == "FINISHED:COMPLETED", done
    for site in fed.deployments:
        d = fed.status(site)
        assert d["job_state"] == "RUNNING" and d["job_id"] == jobs[site], (site, d)


@pytest.mark.timeout(900)
def test_controller_stop_and_network_cut_mid_training_nothing_resubmitted(docker_federation):
    """The controller stopped and a client's node cut off the hub, both for 60 s in the middle
    of training: the roles keep running (the controller is not in the data path; the tunnel
    and NVFlare's connections ride out the cut), status says UNKNOWN meanwhile - never gone -,
    rejoin resubmits nothing, and the next job trains with both clients again."""
    fed, lab = docker_federation, docker_federation.lab
    jobs = {site: fed.status(site)["job_id"] for site in fed.deployments}
    victim = "hospital-a"
    node = fed.status(victim)["node"]
    net = f"{lab.spec.project}_internet"
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(fed.train("long", timeout=600)))
    trainer.start()
    wait_for("the second round", lambda: _round_started(fed, 1), 240, 2)
    subprocess.run(["docker", "stop", lab.spec.container("slurmctld")], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["docker", "network", "disconnect", net, lab.spec.container(node)], check=True)
    try:
        time.sleep(5)
        unknown = fed.hpcfed("status", fed.deployments[victim], "--json", check=False)
        assert json.loads(unknown.stdout)["deployments"][0]["job_state"] == "UNKNOWN", unknown
        time.sleep(55)
    finally:
        subprocess.run(
            ["docker", "network", "connect", "--ip", lab.spec.internet_ip(node), net,
             lab.spec.container(node)],
            capture_output=True,
        )  # fmt: skip
        subprocess.run(["docker", "start", lab.spec.container("slurmctld")], capture_output=True)
        lab.cluster.wait_ready(["slurmctld"])
    trainer.join(timeout=700)
    assert not trainer.is_alive(), "the training job did not end"
    assert result.get("status", "").startswith("FINISHED"), result
    proc = fed.hpcfed("rejoin", "--json", host="login2")
    assert {d["action"] for d in json.loads(proc.stdout)["deployments"]} == {"ok"}, proc.stdout
    for site in fed.deployments:
        d = fed.status(site)
        assert d["job_state"] == "RUNNING" and d["job_id"] == jobs[site], (site, d)
    traffic = fed.hub_traffic()
    again = fed.train("short", timeout=400)
    assert again.get("status") == "FINISHED:COMPLETED", again
    after = fed.hub_traffic()
    assert after[victim][0] - traffic[victim][0] > 20_000, (traffic, after)


def test_the_dashboard_is_on_the_hubs_side_reached_from_login_nodes_only(docker_federation):
    fed, lab = docker_federation, docker_federation.lab
    host_port = fed.dashboard.url.split("//")[1]
    ip, port = host_port.rsplit(":", 1)
    probe = f"nc -z -w 3 {ip} {port}"
    assert lab.sh("login2", probe, timeout=30).returncode == 0
    for node in ("node1", "node2"):
        assert lab.sh(node, probe, timeout=30).returncode != 0, node
