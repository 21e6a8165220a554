"""The role model (hpcfed/frameworks): sides, ports, credentials and per-job ports are data, and
everything that used to branch on a role's name (tunnel forwards, /etc/hosts, listen port,
partition) follows from it - for NVFlare unchanged, for Flower's three roles as Flower needs."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from helpers import HPCFED, hpcfed

from hpcfed import frameworks
from hpcfed.errors import ConfigError
from hpcfed.plan import build_plan, parse_forwards, tunnel_hosts
from hpcfed.profiles import load_site


@pytest.fixture(autouse=True)
def own_dirs(tmp_path, monkeypatch):
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def test_every_role_has_a_side_and_its_ports():
    t = frameworks.table()
    assert set(t) >= {"nvflare", "flower"}
    nv = t["nvflare"]
    assert (nv["server"].side, nv["server"].serves, nv["server"].dials) == (
        "server",
        (("fl", 8002),),
        (),
    )
    assert (nv["client"].side, nv["client"].dials) == ("client", (("fl", 8002),))
    assert nv["client"].credentials == "nvflare-kit" and nv["client"].needs_kit
    fl = t["flower"]
    assert (fl["superlink"].side, fl["supernode"].side, fl["flwr"].side) == (
        "server",
        "client",
        "admin",
    )
    # One HTTPS port carries Fleet, Control and Runtime: served by the SuperLink, dialled by both.
    assert (
        fl["superlink"].serves
        == fl["supernode"].dials
        == fl["flwr"].dials
        == (("superlink", 9093),)
    )
    assert fl["supernode"].local_ports == ("runtime",)
    assert not fl["flwr"].is_job
    env = dict(fl["supernode"].env)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_forwards_follow_from_the_side_not_the_name():
    fl = frameworks.table()["flower"]
    assert fl["superlink"].forwards("10.9.0.2", 9093) == ((), ("9093=127.0.0.1:9093",))
    assert fl["superlink"].forwards("10.9.0.2", 9093, listen_port=19093) == (
        (),
        ("9093=127.0.0.1:19093",),
    )
    assert fl["supernode"].forwards("10.9.0.2", 9093, bind="127.0.11.1") == (
        ("127.0.11.1:9093=10.9.0.2:9093",),
        (),
    )
    assert fl["flwr"].forwards("10.9.0.2", 9093)[0] == ("127.0.0.1:9093=10.9.0.2:9093",)
    # /etc/hosts: the server side maps its own name to where -R delivers, others to their -L.
    server = parse_forwards((), ("9093=127.0.0.1:19093",))
    assert tunnel_hosts("server", ("fl-server", 9093), *server) == (("fl-server", "127.0.0.1"),)
    client = parse_forwards(("127.0.11.1:9093=10.9.0.2:9093",), ())
    assert tunnel_hosts("client", ("fl-server", 9093), *client) == (("fl-server", "127.0.11.1"),)


def _plan(role, **kw):
    return build_plan(
        site=load_site("local"),
        role=role,
        name="fw-test",
        deployment_id="0123456789ab",
        user="alice",
        **kw,
    )


def test_flower_plans_fill_the_federation_address_and_leave_local_ports_to_the_job():
    fl = frameworks.table()["flower"]
    link = _plan(
        fl["superlink"],
        kit="/k",
        tunnel_config="/t.conf",
        remote_forwards=("9093=127.0.0.1:19093",),
        server_address=("fl-server", 9093),
    )
    # The tunnel moved the SuperLink's port on this node: it listens where -R delivers.
    assert link.command[-4:] == ("--host", "127.0.0.1", "--port", "19093")
    assert link.tunnel.hosts == (("fl-server", "127.0.0.1"),)
    assert link.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    node = _plan(fl["supernode"], kit="/k", server_address=("fl-server", 9093), gpus=1)
    assert "fl-server:9093" in node.command
    assert node.command[-1] == "{local_port:runtime}" and node.local_ports == ("runtime",)
    assert json.loads(node.to_json())["local_ports"] == ["runtime"]
    with pytest.raises(ConfigError, match="needs its Flower SuperNode key"):
        _plan(fl["supernode"], server_address=("fl-server", 9093))
    with pytest.raises(ConfigError, match="needs server_name"):
        _plan(fl["supernode"], kit="/k")


SERVERS = [
    ("nvflare", "server", 8002),
    ("flower", "superlink", 9093),
    ("fedbiomed", "researcher", 50051),
]
CLIENTS = [("nvflare", "client", 8002), ("flower", "supernode", 9093), ("fedbiomed", "node", 50051)]


@pytest.mark.parametrize("fw, name, port", SERVERS)
def test_a_server_roles_forwards_follow_from_the_ports_it_serves(fw, name, port):
    role = frameworks.table()[fw][name]
    plan = _plan(role, kit="/k", tunnel_config="/t.conf", server_address=("fed.example", port))
    assert plan.tunnel.remote_forwards == (f"{port}=127.0.0.1:{port}",)
    assert plan.tunnel.local_forwards == ()
    assert plan.tunnel.hosts == (("fed.example", "127.0.0.1"),)


@pytest.mark.parametrize("fw, name, port", CLIENTS)
def test_a_client_roles_forwards_follow_from_the_ports_it_dials(fw, name, port):
    role = frameworks.table()[fw][name]

    def plan(name="fw-test", user="alice", **kw):
        return build_plan(
            site=load_site("local"), role=role, name=name, deployment_id="0123456789ab",
            user=user, kit="/k", tunnel_config="/t.conf", server_address=("fed.example", port),
            gpus=1, **kw,
        )  # fmt: skip

    first = plan(server_ip="10.220.0.2")
    (spec,) = first.tunnel.local_forwards
    bind, _, target = spec.rpartition(f":{port}=")
    assert target == f"10.220.0.2:{port}" and first.tunnel.remote_forwards == ()
    # The deployment's own loopback address: the server name resolves to it in the container.
    assert bind.startswith("127.") and bind.endswith(".1") and bind != "127.0.0.1"
    assert first.tunnel.hosts == (("fed.example", bind),)
    # The same deployment keeps it (a requeue, a dry run); other deployments and users do not
    # share it, so two clients on one node do not collide on the port.
    assert plan(server_ip="10.220.0.2").tunnel.local_forwards == (spec,)
    binds = {
        plan(name=n, user=u, server_ip="10.220.0.2").tunnel.local_forwards[0].split(":")[0]
        for n in ("site-1", "site-2", "site-3")
        for u in ("alice", "bob")
    }
    assert len(binds) == 6
    # Given forwards replace the derived ones.
    given = plan(local_forwards=(f"127.0.11.1:{port}=10.220.0.9:{port}",))
    assert given.tunnel.hosts == (("fed.example", "127.0.11.1"),)
    with pytest.raises(ConfigError, match="--server-ip: the .* dials the server's port"):
        plan()
    with pytest.raises(ConfigError, match="either the server's address or -L/-R"):
        plan(server_ip="10.220.0.2", local_forwards=(f"{port}=10.220.0.9:{port}",))
    with pytest.raises(ConfigError, match="not an IPv4 tunnel address"):
        plan(server_ip="fed.example")


def test_server_ip_is_refused_where_it_means_nothing():
    nv = frameworks.table()["nvflare"]
    with pytest.raises(ConfigError, match="is the server"):
        _plan(nv["server"], kit="/k", tunnel_config="/t.conf", server_ip="10.220.0.2")
    with pytest.raises(ConfigError, match="--server-ip: need --tunnel-config"):
        _plan(nv["client"], kit="/k", gpus=1, server_ip="10.220.0.2")
    # --command runs something else: it needs no forwards.
    plan = _plan(nv["client"], command="true", tunnel_config="/t.conf", gpus=1)
    assert plan.tunnel.local_forwards == () and plan.tunnel.hosts == ()


def test_an_nvflare_plan_has_no_new_fields():
    plan = _plan(frameworks.role("nvflare", "client"), kit="/k", gpus=1)
    data = json.loads(plan.to_json())
    assert "env" not in data and "local_ports" not in data


def test_a_profile_partition_for_a_side_applies_to_every_framework(monkeypatch):
    site = load_site("local", environ={"HPCFED_SITE__PARTITIONS__CLIENT": "gpuq"})
    plan = build_plan(
        site=site,
        role=frameworks.role("flower", "supernode"),
        name="p",
        deployment_id="d",
        user="u",
        kit="/k",
        server_address=("s", 1),
    )
    assert plan.resources.partition == "gpuq"


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "superlink", "--framework", "nope", "--site", "local", "--dry-run"),
        ("submit", "gateway", "--site", "local", "--dry-run"),
    ],
)
def test_submit_of_an_unknown_framework_or_role_lists_what_exists(args):
    proc = hpcfed(*args)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "nvflare: client, server; flower: superlink, supernode, flwr" in lines[0]


def test_the_operator_console_is_not_a_job():
    proc = hpcfed("submit", "flwr", "--site", "local", "--dry-run")
    assert proc.returncode == 3
    assert "roles to submit: superlink, supernode" in proc.stderr


def test_submit_finds_the_framework_from_the_role_name(tmp_path):
    proc = hpcfed("submit", "superlink", "--site", "local", "--dry-run")
    # Flower's role, so Flower's credentials are what is missing (not an NVFlare kit).
    assert proc.returncode != 0 and "no Flower superlink credentials" in proc.stderr, proc.stderr


def _hold_port_job(tmp_path, name):
    """A supervisor running, like a SuperNode, a process that binds its per-job local port."""
    plan = build_plan(
        site=load_site("local"),
        role=frameworks.role("flower", "supernode"),
        name=name,
        deployment_id=name,
        user="u",
        gpus=0,
        command=(
            "exec python3 -c 'import socket,sys,time; s=socket.socket(); "
            's.bind(("127.0.0.1", {local_port:runtime})); s.listen(); '
            'print("bound", s.getsockname()[1], flush=True); time.sleep(30)\''
        ),
    )
    d = tmp_path / name
    d.mkdir()
    (d / "plan.json").write_text(plan.to_json())
    return subprocess.Popen(
        HPCFED + ["job", "run", str(d / "plan.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_jobs_of_a_role_on_one_node_get_their_own_local_port(tmp_path):
    jobs = [_hold_port_job(tmp_path, f"node-{i}") for i in range(2)]
    ports = []
    try:
        for job in jobs:
            deadline = time.monotonic() + 30
            for line in job.stdout:
                if line.startswith("bound"):
                    ports.append(int(line.split()[1]))
                    break
                assert time.monotonic() < deadline and "Address already in use" not in line
        assert len(ports) == 2 and ports[0] != ports[1]
        for port in ports:  # both really hold them at once
            with pytest.raises(OSError):
                socket.socket().bind(("127.0.0.1", port))
    finally:
        for job in jobs:
            job.terminate()
            job.wait(timeout=30)


def test_a_known_failure_is_named_in_one_line_and_a_passing_one_retried(tmp_path):
    """A stand-in `flower-supernode` (the real one runs in the e2e test, in its image): refused
    once with Flower's exit code 305 as after a requeue, then accepted."""
    import os

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "flower-supernode"
    fake.write_text(
        "#!/bin/sh\n"
        f"if [ -e {tmp_path}/refused ]; then echo accepted; exit 0; fi\n"
        f"touch {tmp_path}/refused\n"
        "echo 'ERROR : Exit Code: 305'; echo 'Failed to activate SuperNode.'; exit 1\n"
    )
    fake.chmod(0o755)
    plan = build_plan(
        site=load_site("local"),
        role=frameworks.role("flower", "supernode"),
        name="refused",
        deployment_id="d",
        user="u",
        gpus=0,
        kit=str(tmp_path),
        server_address=("fl-server", 9093),
    )
    (tmp_path / "plan.json").write_text(plan.to_json())
    proc = subprocess.run(
        HPCFED + ["job", "run", str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
    )
    out = proc.stdout + proc.stderr
    assert (
        "flower supernode: the SuperLink refused to activate this SuperNode: its public key is "
        "not registered (the operator runs `hpcfed kit flower register`) (flower exit code 305)"
    ) in out
    assert "retrying in 10s" in out and "accepted" in out
    assert proc.returncode == 0 and "role ended: exit code 0" in out


def test_flower_images_are_planned_from_the_role_table(tmp_path):
    proc = hpcfed(
        "image", "build", "supernode", "--version", "1.42.0", "--image-dir", str(tmp_path),
        "--dry-run", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["framework"] == "flower" and plan["definition"].endswith("flower-supernode.def")
    assert plan["output"] == str(tmp_path / "flower-supernode-1.42.0.sif")
    assert "FRAMEWORK_VERSION=1.42.0" in plan["command"]
    bad = hpcfed("image", "build", "flwr", "--framework", "flower", "--version", "1.42.0")
    assert (
        bad.returncode == 3
        and "expected base or a flower role (superlink, supernode)" in bad.stderr
    )
