"""The userspace tunnel against a real, independent WireGuard hub.

Topology (root builds it; nothing leaves this machine): a network namespace with wireguard-go +
wg as the hub (brought up by `hpcfed hub`), a veth pair with private addresses into it. Two
non-root users without TUN access (/dev/net/tun stays root-only) run `hpcfed tunnel up` in the
root namespace, dialing the hub's veth address: `tunsrv` is a federation server exposing local
services with -R, `tuncli` a client reaching them with -L. A third user, `tunother`, is the
neighbour on a shared node.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import HPCFED, hpcfed, need, run, user_env

pytestmark = pytest.mark.wireguard

SRV, CLI, OTHER = "tunsrv", "tuncli", "tunother"
SINK_PORT, ECHO_PORT = 19000, 19001  # services of the server job (loopback)
SINK_FWD, ECHO_FWD = 29000, 29001  # the client's local forwards

# The server job's services: a sink that hashes all it reads and answers after the client's
# half-close, and an echo server; both thread per connection.
SERVICES = r"""
import hashlib, socket, sys, threading
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()
def sink(c):
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
def echo(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.shutdown(socket.SHUT_WR); c.close()
threading.Thread(target=serve, args=(int(sys.argv[1]), sink), daemon=True).start()
serve(int(sys.argv[2]), echo)
"""

# Client-side traffic: runs as a user, prints a JSON verdict.
BULK = r"""
import hashlib, json, os, socket, sys, time
port, total = int(sys.argv[1]), int(sys.argv[2])
block = os.urandom(1 << 20)
h = hashlib.sha256(); c = socket.create_connection(("127.0.0.1", port), timeout=120)
t = time.monotonic(); sent = 0; i = 0
while sent < total:
    chunk = i.to_bytes(8, "big") + block[8:]  # every MiB differs: reordering would show
    c.sendall(chunk); h.update(chunk); sent += len(chunk); i += 1
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(4096)
    if not b: break
    reply += b
n, digest = reply.decode().split()
print(json.dumps({"sent": sent, "received": int(n), "match": digest == h.hexdigest(), "seconds": time.monotonic() - t}))
"""

CONCURRENT = r"""
import json, os, socket, sys, threading
port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results, errors = [], []
def one(i):
  try:
    data = os.urandom(size)
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    def send(): c.sendall(data); c.shutdown(socket.SHUT_WR)
    th = threading.Thread(target=send); th.start()
    got = b""
    while True:
        b = c.recv(65536)
        if not b: break
        got += b
    th.join(); c.close(); results.append(got == data)
    if got != data: errors.append(f"short: {len(got)}")
  except Exception as e:
    errors.append(repr(e))
ts = [threading.Thread(target=one, args=(i,)) for i in range(count)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"ok": sum(results), "count": count, "errors": sorted(set(errors))}))
"""

PROBE = r"""
import json, socket, sys
try:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    c.sendall(b"hello"); c.shutdown(socket.SHUT_WR)
    data = c.recv(4096)
    print(json.dumps({"connected": True, "data": data.decode(errors="replace")}))
except OSError as e:
    print(json.dumps({"connected": False, "error": str(e)}))
"""


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)


class HubNet:
    """A hub in its own network namespace, reachable from the root namespace over a veth pair."""

    def __init__(self, tag: str, subnet: int):
        self.ns = f"hpcfed-{tag}"
        self.iface = (
            f"hf{tag[:5]}{uuid.uuid4().hex[:4]}"  # names are global (wireguard-go's socket)
        )
        self.veth = f"vh{tag[:5]}{subnet}"
        self.root_ip, self.hub_ip = f"10.197.{subnet}.1", f"10.197.{subnet}.2"
        self.endpoint = f"{self.hub_ip}:51820"
        self.dir = Path(tempfile.mkdtemp(prefix=f"hpcfed-{tag}-"))
        os.chmod(self.dir, 0o700)
        self.env = {"HPCFED_HUB_DIR": str(self.dir / "hub")}

    def create(self) -> None:
        sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth + "a"], capture_output=True)
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth + "a", "type", "veth", "peer", "name", self.veth + "b")
        sh("ip", "link", "set", self.veth + "b", "netns", self.ns)
        sh("ip", "addr", "add", f"{self.root_ip}/30", "dev", self.veth + "a")
        sh("ip", "link", "set", self.veth + "a", "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.hub_ip}/30", "dev", self.veth + "b")
        sh("ip", "-n", self.ns, "link", "set", self.veth + "b", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def hub(self, *args: str, check: bool = True, timeout: float = 60):
        """`hpcfed hub ...` run as root inside the hub's namespace."""
        proc = run(
            ["ip", "netns", "exec", self.ns] + HPCFED + ["hub", *args],
            env=self.env,
            timeout=timeout,
        )
        if check:
            assert proc.returncode == 0, f"hub {args}: {proc.stderr}"
        return proc

    def wg_dump(self) -> dict[str, list[str]]:
        out = run(
            ["ip", "netns", "exec", self.ns, "wg", "show", self.iface, "dump"], check=True
        ).stdout
        return {line.split("\t")[0]: line.split("\t") for line in out.splitlines()[1:]}

    def destroy(self) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "ip", "link", "del", self.iface], capture_output=True
        )
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth + "a"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def need_hub_tools() -> None:
    need(os.geteuid() == 0, "the hub namespace needs root")
    for tool in ("wireguard-go", "wg", "ip", "runuser"):
        need(
            shutil.which(tool) is not None,
            f"{tool} is not installed (scripts/bootstrap.d/50-wireguard.sh)",
        )
    need(os.path.exists("/dev/net/tun"), "wireguard-go needs /dev/net/tun")


def peer_config(net: HubNet, type_: str, id_: str, user: str) -> tuple[str, str]:
    """genconf on the hub, hand the file to `user`, keygen there, add the public key on the hub."""
    info = json.loads(net.hub("genconf", type_, id_, "--json").stdout)
    home = Path(pwd.getpwnam(user).pw_dir)
    conf = home / f"{id_}.conf"
    shutil.copy(info["config"], conf)
    shutil.chown(conf, user, user)
    os.chmod(conf, 0o600)
    keygen = hpcfed("vpn", "keygen", "--config", str(conf), "--force", "--json", user=user)
    assert keygen.returncode == 0, keygen.stderr
    pub = json.loads(keygen.stdout)["public_key"]
    net.hub("add", type_, id_, pub)
    return str(conf), info["address"]


class Tunnel:
    """`hpcfed tunnel up` as a user, in the foreground, like a job would run it."""

    def __init__(self, user: str, conf: str, *args: str, name: str = ""):
        self.user = user
        home = Path(pwd.getpwnam(user).pw_dir)
        name = name or Path(conf).stem
        self.ready = home / f"{name}.ready"
        self.status = home / f"{name}.status"
        self.ready.unlink(missing_ok=True)
        self.log = open(tempfile.mktemp(prefix=f"tunnel-{user}-"), "w+")
        env = dict(os.environ, **user_env(user))
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"]
            + HPCFED
            + [
                "tunnel",
                "up",
                "--config",
                conf,
                "--ready-file",
                str(self.ready),
                "--status-file",
                str(self.status),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists():
                return
            assert self.proc.poll() is None, (
                f"tunnel exited {self.proc.returncode}: {self.output()}"
            )
            time.sleep(0.05)
        raise AssertionError(f"no readiness within {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # runuser and the tunnel under it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def as_user(user: str, script: str, *args, timeout: float = 120) -> dict:
    proc = run([sys.executable, "-c", script, *map(str, args)], user=user, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def fed():
    """Hub + server tunnel (tunsrv, -R) + client tunnel (tuncli, -L) + the server's services."""
    need_hub_tools()
    for u in (SRV, CLI, OTHER):
        _ensure_user(u)
    net = HubNet("tun", 53)
    procs, tunnels = [], []
    try:
        net.create()
        # hub keepalive 2 s + tunnel liveness 5 s: a restarted hub is noticed within seconds
        net.hub("init", "--endpoint", net.endpoint, "--interface", net.iface, "--keepalive", "2")
        net.hub("up", "--userspace")
        srv_conf, srv_ip = peer_config(net, "server", "fl-server", SRV)
        cli_conf, _ = peer_config(net, "client", "site1", CLI)
        services = subprocess.Popen(
            [
                "runuser",
                "-u",
                SRV,
                "--",
                sys.executable,
                "-c",
                SERVICES,
                str(SINK_PORT),
                str(ECHO_PORT),
            ],
            start_new_session=True,
        )
        procs.append(services)
        server = Tunnel(
            SRV,
            srv_conf,
            "-R",
            f"9000=127.0.0.1:{SINK_PORT}",
            "-R",
            f"9001=127.0.0.1:{ECHO_PORT}",
            "--liveness",
            "5",
        )
        client = Tunnel(
            CLI,
            cli_conf,
            "-L",
            f"127.0.0.1:{SINK_FWD}={srv_ip}:9000",
            "-L",
            f"{ECHO_FWD}={srv_ip}:9001",
            "--liveness",
            "5",
        )
        tunnels += [server, client]
        server.wait_ready()
        client.wait_ready()
        yield {
            "net": net,
            "server": server,
            "client": client,
            "srv_ip": srv_ip,
            "cli_conf": cli_conf,
        }
    finally:
        for t in tunnels:
            t.stop()
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        net.destroy()


def test_tunnel_runs_unprivileged_without_tun(fed):
    """The point of the design: the peers are plain user processes with no TUN device open."""
    for t, user in ((fed["server"], SRV), (fed["client"], CLI)):
        status = Path(f"/proc/{t.proc.pid}/status").read_text()
        uid = int(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[2])
        assert uid == pwd.getpwnam(user).pw_uid != 0
        cap_eff = int(
            next(l for l in status.splitlines() if l.startswith("CapEff:")).split()[1], 16
        )
        assert cap_eff == 0, "the tunnel must not need any capability"
        fds = [
            os.readlink(f"/proc/{t.proc.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{t.proc.pid}/fd")
        ]
        assert not any("tun" in f for f in fds if f.startswith("/dev")), fds


@pytest.mark.timeout(120)
def test_ready_file_and_status_counters(fed):
    ready = fed["server"].ready
    assert ready.stat().st_mode & 0o777 == 0o600
    assert json.loads(ready.read_text())["address"] == fed["srv_ip"]
    # a connection, so the counters have something to show
    assert as_user(CLI, PROBE, ECHO_FWD)["data"] == "hello"
    time.sleep(1.2)  # the status file is rewritten every second
    proc = hpcfed(
        "tunnel", "status", "--status-file", str(fed["client"].status), "--json", user=CLI
    )
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["state"] == "up" and st["handshakes"] >= 1
    assert st["last_handshake_age_s"] is not None and st["last_handshake_age_s"] < 180
    assert st["connections_total"] >= 1 and st["tx_bytes"] > 0 and st["rx_bytes"] > 0
    assert fed["client"].status.stat().st_mode & 0o777 == 0o600
    table = hpcfed("tunnel", "status", "--status-file", str(fed["client"].status), user=CLI)
    assert "up" in table.stdout and "10.221." in table.stdout


@pytest.mark.timeout(400)
def test_one_gib_crosses_byte_exact(fed):
    """Client -> hub -> server, 1 GiB, then the client's half-close and the server's answer."""
    verdict = as_user(CLI, BULK, SINK_FWD, 1 << 30, timeout=380)
    assert verdict["sent"] == verdict["received"] == 1 << 30
    assert verdict["match"], "the server received different bytes"
    print(
        f"1 GiB through the tunnel in {verdict['seconds']:.1f}s "
        f"({8 * (1 << 30) / verdict['seconds'] / 1e6:.0f} Mbit/s)"
    )


@pytest.mark.timeout(180)
def test_fifty_concurrent_connections(fed):
    verdict = as_user(CLI, CONCURRENT, ECHO_FWD, 50, 256 * 1024, timeout=170)
    assert verdict["ok"] == 50, (
        verdict,
        fed["client"].output()[-3000:],
        fed["server"].output()[-3000:],
    )


@pytest.mark.timeout(60)
def test_other_user_is_refused_on_local_forward(fed):
    probe = as_user(OTHER, PROBE, ECHO_FWD)
    assert not probe.get("data"), f"another user got through the forward: {probe}"
    assert "refused connection" in fed["client"].output() and "uid" in fed["client"].output()
    # the owner still gets through
    assert as_user(CLI, PROBE, ECHO_FWD)["data"] == "hello"


@pytest.mark.timeout(90)
def test_roaming_and_unforwarded_port(fed):
    """The same key from a new UDP address (a job restarted on another node) takes over at the
    hub; a -L to a tunnel port nobody forwards fails for the local client; the old tunnel then
    roams back by itself."""
    t = Tunnel(
        CLI,
        fed["cli_conf"],
        "-L",
        f"29100={fed['srv_ip']}:9999",
        "--handshake-timeout",
        "10",
        name="moved",
    )
    try:
        # same key as the running client: the hub follows whichever endpoint spoke last, which
        # is the roaming case; the original client tunnel re-handshakes afterwards by itself.
        t.wait_ready()
        probe = as_user(CLI, PROBE, 29100)
        assert not probe.get("data")
    finally:
        t.stop()
    deadline = time.monotonic() + 40
    while as_user(CLI, PROBE, ECHO_FWD).get("data") != "hello":
        assert time.monotonic() < deadline, "the original client tunnel did not re-take its address"
        time.sleep(0.5)


@pytest.mark.timeout(60)
def test_unknown_key_gets_no_handshake(fed):
    """A peer whose public key the hub does not know: no handshake, exit 9 with its own message."""
    home = Path(pwd.getpwnam(OTHER).pw_dir)
    conf = home / "stranger.conf"
    text = Path(fed["cli_conf"]).read_text()
    text = "\n".join(l for l in text.splitlines() if not l.startswith("PrivateKey"))
    conf.write_text(text.replace("Address = 10.221.0.1/32", "Address = 10.221.9.9/32"))
    shutil.chown(conf, OTHER, OTHER)
    os.chmod(conf, 0o600)
    assert hpcfed("vpn", "keygen", "--config", str(conf), "--force", user=OTHER).returncode == 0
    proc = hpcfed(
        "tunnel", "up", "--config", str(conf), "--handshake-timeout", "3", user=OTHER, timeout=30
    )
    assert proc.returncode == 9
    assert f"no UDP egress to the hub {fed['net'].endpoint}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_hub_restart_is_survived(fed):
    """Kill the hub's WireGuard (interface and wireguard-go gone), restore it from the registry:
    both tunnels re-handshake on their own and new connections work again."""
    net = fed["net"]
    net.hub("down")
    assert as_user(CLI, PROBE, ECHO_FWD, timeout=30).get("data") != "hello"
    net.hub("up", "--userspace")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if as_user(CLI, PROBE, ECHO_FWD, timeout=30).get("data") == "hello":
            break
        time.sleep(1)
    else:
        raise AssertionError("the tunnels did not come back after the hub restarted")
    assert fed["server"].proc.poll() is None and fed["client"].proc.poll() is None
    # and large traffic flows again
    assert as_user(CLI, CONCURRENT, ECHO_FWD, 5, 1 << 20, timeout=60)["ok"] == 5


@pytest.mark.timeout(60)
def test_sigterm_stops_cleanly(fed):
    t = Tunnel(CLI, fed["cli_conf"], "-L", "29200=10.220.0.2:9001", name="sigterm")
    t.wait_ready()
    assert t.stop() == 0
    assert not t.ready.exists(), "the ready file must go when the tunnel stops"
