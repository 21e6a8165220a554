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
import hashlib, resource, socket, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(1024)
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


def _free_subnet(preferred: int) -> int:
    """A 10.197.N.0/30 no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for n in [preferred] + list(range(100, 250)):
        if f"10.197.{n}." not in used:
            return n
    raise RuntimeError("no free 10.197.N.0/30 subnet for a test hub")


class HubNet:
    """A hub in its own network namespace, reachable from the root namespace over a veth pair."""

    def __init__(self, tag: str, subnet: int):
        # unique names and a free subnet: another run of these tests (another user's checkout,
        # the lead's suite) may hold the same ones at the same time
        run_id = uuid.uuid4().hex[:4]
        subnet = _free_subnet(subnet)
        self.ns = f"hpcfed-{tag}-{run_id}"
        self.iface = f"hf{tag[:5]}{run_id}"  # names are global (wireguard-go's socket)
        self.veth = f"vh{tag[:4]}{run_id}"
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
    """`hpcfed tunnel up` as a user, in the foreground, like a job would run it.

    `status=False` leaves the status file at its default place; `prefix` wraps the command
    (e.g. a UTS namespace for another host name); user "root" runs it as root."""

    def __init__(
        self,
        user: str,
        conf: str,
        *args: str,
        name: str = "",
        status: bool = True,
        prefix: tuple[str, ...] = (),
        env: dict | None = None,
        status_dir: Path | None = None,
    ):
        self.user = user
        home = Path(pwd.getpwnam(user).pw_dir)
        name = name or Path(conf).stem
        self.ready = home / f"{name}.ready"
        self.status = (status_dir or home) / f"{name}.status"
        self.ready.unlink(missing_ok=True)
        self.status.unlink(missing_ok=True)  # never read an earlier run's status
        self.log = open(tempfile.mktemp(prefix=f"tunnel-{user}-"), "w+")
        full_env = {**os.environ, **user_env(user), **(env or {})}
        become = (
            []
            if user == "root"
            else ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"]
        )
        argv = HPCFED + ["tunnel", "up", "--config", conf, "--ready-file", str(self.ready)]
        if status:
            argv += ["--status-file", str(self.status)]
        self.proc = subprocess.Popen(
            list(prefix) + become + argv + list(args),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
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

    def counters(self) -> dict:
        return json.loads(self.status.read_text())

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


# ---- issue 12 §3: defects of the tunnel, each against the real hub and real second users ----

CONNECT_SEND_CLOSE = r"""
import json, socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c.sendall(b"hello"); c.close()
print(json.dumps({"sent": True}))
"""


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
def test_status_file_in_a_shared_directory_cannot_be_taken_over(fed, tmp_path):
    """#8: the status file is rewritten every second through a temp file. Another user of a
    shared sticky directory (/tmp-like) pre-creates the temp name the tunnel will use; the
    tunnel must still write its own file, 0600, owned by its user."""
    shared = Path(tempfile.mkdtemp(prefix="hpcfed-sticky-"))
    os.chmod(shared, 0o1777)
    conf, _ = peer_config(fed["net"], "client", "sticky-site", CLI)
    t = Tunnel(CLI, conf, "-L", "29600=10.220.0.2:9001", name="sticky", status_dir=shared)
    try:
        t.wait_ready()
        pid = t.proc.pid
        # the names a predictable writer would use next, made by the other user first
        for name in (f"sticky.status.tmp{pid}", f".sticky.status.tmp{pid}"):
            as_user(
                OTHER,
                "import json, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o666);"
                " os.fchmod(fd, 0o666); print(json.dumps({}))",
                shared / name,
            )
        before = t.counters()["updated_at"]
        _wait(lambda: t.counters()["updated_at"] > before + 1.5, 10, "two status rewrites")
        st = t.status.stat()
        assert st.st_uid == pwd.getpwnam(CLI).pw_uid, "another user owns the tunnel's status file"
        assert st.st_mode & 0o777 == 0o600
    finally:
        t.stop()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.timeout(90)
def test_tunnel_run_as_root_refuses_a_client_that_already_closed(fed):
    """#9: a client that connects, sends and closes before the tunnel looks at it leaves a
    socket the kernel lists with uid 0 (orphan / TIME_WAIT). A tunnel run as root must not take
    that for its own: the owner is not proven, the connection is refused."""
    conf, _ = peer_config(fed["net"], "client", "root-site", "root")
    t = Tunnel("root", conf, "-L", f"29300={fed['srv_ip']}:9001", name="rootfwd")
    try:
        t.wait_ready()
        os.kill(t.proc.pid, signal.SIGSTOP)  # the kernel still accepts into the backlog
        try:
            assert as_user(OTHER, CONNECT_SEND_CLOSE, 29300)["sent"]
            time.sleep(0.5)  # the client's socket is closed: orphaned, then TIME_WAIT
        finally:
            os.kill(t.proc.pid, signal.SIGCONT)
        c = _wait(
            lambda: (lambda c: c if c["connections_refused"] + c["connections_total"] else None)(
                t.counters()
            ),
            10,
            "the tunnel to handle the connection",
        )
        assert (c["connections_refused"], c["connections_total"]) == (1, 0), t.output()
        assert "refused connection" in t.output()
        # root's own connections still work
        proc = run([sys.executable, "-c", PROBE, "29300"], timeout=30)
        assert json.loads(proc.stdout)["data"] == "hello"
    finally:
        t.stop()


def test_bad_timer_values_are_one_line_exit_3(fed):
    """#12: `--liveness 1e300` used to panic in Rust and end in a Python traceback."""
    for flag, value in (("--liveness", "1e300"), ("--handshake-timeout", "nan")):
        proc = hpcfed("tunnel", "up", "--config", fed["cli_conf"], flag, value, user=CLI)
        assert proc.returncode == 3, proc.stderr
        assert flag in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr


@pytest.mark.timeout(60)
def test_status_of_a_tunnel_on_another_host_is_unknown_not_dead(fed):
    """#12: read from a login node (another host name, same home), an in-job tunnel's pid
    means nothing: status shows its host and "unknown" instead of calling it dead."""
    t = Tunnel(
        CLI,
        fed["cli_conf"],
        "-L",
        "29700=10.220.0.2:9001",
        "--handshake-timeout",
        "60",
        name="elsewhere",
        prefix=("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', "jobnode-7"),
    )
    try:
        _wait(lambda: t.status.exists(), 15, "the status file")
        proc = hpcfed("tunnel", "status", "--status-file", str(t.status), "--json", user=CLI)
        st = json.loads(proc.stdout)
        assert (st["state"], st["host"]) == ("unknown", "jobnode-7"), st
        table = hpcfed("tunnel", "status", "--status-file", str(t.status), user=CLI).stdout
        assert "jobnode-7" in table and "unknown" in table
    finally:
        t.stop()


@pytest.mark.timeout(60)
def test_configs_with_the_same_file_name_keep_separate_status(fed, tmp_path):
    """#12: every hub peer file is wg.conf; two tunnels of two such configs must not share a
    status file (it is keyed by the config's full path)."""
    home = Path(pwd.getpwnam(CLI).pw_dir)
    state = home / f"state-{uuid.uuid4().hex[:6]}"
    confs: list[str] = []
    for site in ("site-a", "site-b"):
        d = home / f"{site}-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        shutil.copy(fed["cli_conf"], d / "wg.conf")
        os.chmod(d / "wg.conf", 0o600)
        subprocess.run(["chown", "-R", f"{CLI}:{CLI}", str(d)], check=True)
        confs.append(str(d / "wg.conf"))
    env = {"XDG_STATE_HOME": str(state)}
    tunnels = [
        Tunnel(
            CLI,
            c,
            "-L",
            f"{29800 + i}=10.220.0.2:9001",
            "--handshake-timeout",
            "60",
            name=f"same{i}",
            status=False,
            env=env,
        )
        for i, c in enumerate(confs)
    ]
    try:

        def listed():
            rows = json.loads(hpcfed("tunnel", "status", "--json", user=CLI, env=env).stdout)
            return rows if len(rows) == 2 else None

        rows = _wait(listed, 15, "two status rows")
        assert sorted(r["config"] for r in rows) == sorted(confs)
        assert len({r["status_file"] for r in rows}) == 2
    finally:
        for t in tunnels:
            t.stop()
        for path in [state] + [Path(c).parent for c in confs]:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
def test_hub_forwards_only_what_the_federation_needs(fed):
    """#12: the hub routes peer -> server, not client -> client nor peer -> the hub's own
    services. A second client site exposes a port with -R; the first client cannot reach it,
    nor a service listening on the hub; the server stays reachable."""
    net = fed["net"]
    conf2, ip2 = peer_config(net, "client", "site2", OTHER)
    site2 = Tunnel(OTHER, conf2, "-R", f"9100=127.0.0.1:{ECHO_PORT}", name="site2")
    hub_service = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            net.ns,
            sys.executable,
            "-c",
            "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
            " s.bind(('0.0.0.0', 9200)); s.listen(8)\nwhile True:\n c, _ = s.accept(); c.sendall(b'hub'); c.close()",
        ],
        start_new_session=True,
    )
    probe_conf, _ = peer_config(net, "client", "policy-probe", CLI)
    probe = Tunnel(
        CLI,
        probe_conf,
        "-L",
        f"29401={ip2}:9100",
        "-L",
        "29402=10.220.0.1:9200",
        "-L",
        f"29403={fed['srv_ip']}:9001",
        name="policy",
    )
    try:
        site2.wait_ready()
        probe.wait_ready()
        assert as_user(CLI, PROBE, 29403)["data"] == "hello", "the server must stay reachable"
        assert not as_user(CLI, PROBE, 29401).get("data"), "a client reached another client"
        assert not as_user(CLI, PROBE, 29402).get("data"), "a peer reached a service on the hub"
    finally:
        probe.stop()
        site2.stop()
        os.killpg(hub_service.pid, signal.SIGKILL)
        hub_service.wait()


HOLD = r"""
import json, socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) for _ in range(int(sys.argv[2]))]
for s in socks:
    s.sendall(b"x"); assert s.recv(1) == b"x"
print(json.dumps({"open": len(socks)}), flush=True)
sys.stdin.read()  # hold them until told
"""


@pytest.mark.timeout(120)
def test_remote_forward_connection_cap(fed):
    """#12: `-R` has a cap (--max-connections): connections beyond it are reset and counted;
    when one closes, a new one gets through."""
    net = fed["net"]
    conf, ip = peer_config(net, "server", "capped", SRV)
    srv = Tunnel(
        SRV, conf, "-R", f"9300=127.0.0.1:{ECHO_PORT}", "--max-connections", "3", name="capped"
    )
    cli_conf, _ = peer_config(net, "client", "cap-client", CLI)
    cli = Tunnel(CLI, cli_conf, "-L", f"29501={ip}:9300", name="capcli")
    holder = None
    try:
        srv.wait_ready()
        cli.wait_ready()
        holder = subprocess.Popen(
            ["runuser", "-u", CLI, "--", sys.executable, "-c", HOLD, "29501", "3"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(holder.stdout.readline())["open"] == 3
        assert not as_user(CLI, PROBE, 29501).get("data"), "a 4th connection got through"
        _wait(lambda: srv.counters()["connections_over_limit"] >= 1, 5, "the over-limit count")
        holder.stdin.close()
        holder.wait(10)
        _wait(lambda: as_user(CLI, PROBE, 29501).get("data") == "hello", 20, "room again")
    finally:
        if holder and holder.poll() is None:
            holder.kill()
        cli.stop()
        srv.stop()


SEQUENTIAL = r"""
import json, socket, sys, threading, time
port, total, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
held = socket.create_connection(("127.0.0.1", port), timeout=30)
held.sendall(b"a"); assert held.recv(1) == b"a"
failures, done = [], [0]
def work(n):
    for i in range(n):
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            c.sendall(b"z"); ok = c.recv(1) == b"z"; c.close()
            if not ok: failures.append(i)
        except OSError as e:
            failures.append(repr(e))
        done[0] += 1
t0 = time.monotonic()
ts = [threading.Thread(target=work, args=(total // workers,)) for _ in range(workers)]
[t.start() for t in ts]; [t.join() for t in ts]
held.sendall(b"b")
still = held.recv(1) == b"b"
print(json.dumps({"done": done[0], "failures": failures[:5], "nfail": len(failures), "held_ok": still, "seconds": time.monotonic() - t0}))
"""


@pytest.mark.timeout(900)
def test_many_sequential_connections_never_reuse_a_live_local_port(fed):
    """#12 / issue 16: local tunnel ports used to wrap after 20,000 connections with no in-use
    check, so connection 20,000 took the port of one still open. 100,000 connections (4 at a
    time, each a full connect/echo/close) while one connection stays open: all succeed and the
    open one still works."""
    total = int(os.environ.get("HPCFED_TEST_SEQUENTIAL", "100000"))
    v = as_user(CLI, SEQUENTIAL, ECHO_FWD, total, 4, timeout=880)
    assert v["done"] == total and v["nfail"] == 0, v
    assert v["held_ok"], "the long-lived connection broke: its local port was reused"


# ---- issue 16: scale ----

RAISE_NOFILE = (
    "import resource; s, h = resource.getrlimit(resource.RLIMIT_NOFILE);"
    " resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))\n"
)


@pytest.mark.timeout(300)
def test_a_thousand_concurrent_connections(fed):
    """1,000 connections open at once through one client tunnel and one server tunnel, each
    echoing 16 KiB byte-exact (the tunnels raise their own open-file limit)."""
    verdict = as_user(CLI, RAISE_NOFILE + CONCURRENT, ECHO_FWD, 1000, 16 * 1024, timeout=280)
    assert verdict["ok"] == 1000, (
        verdict,
        fed["client"].counters(),
        fed["server"].counters(),
        fed["client"].output()[-1000:],
        fed["server"].output()[-1000:],
    )


FLOOD = r"""
import json, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
t0, connected = time.monotonic(), 0
for _ in range(count):
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        connected += 1
        c.close()
    except OSError:
        pass
print(json.dumps({"connected": connected, "seconds": time.monotonic() - t0}))
"""

TIMED_BULK = r"""
import json, os, socket, sys, time
port, total = int(sys.argv[1]), int(sys.argv[2])
block = os.urandom(1 << 20)
c = socket.create_connection(("127.0.0.1", port), timeout=120)
t0 = last = time.monotonic(); gap = 0.0; sent = 0
while sent < total:
    c.sendall(block); sent += len(block)
    now = time.monotonic(); gap = max(gap, now - last); last = now
c.shutdown(socket.SHUT_WR)
reply = c.recv(4096).decode().split()
print(json.dumps({"received": int(reply[0]), "max_gap": gap, "seconds": time.monotonic() - t0}))
"""


@pytest.mark.timeout(300)
def test_a_neighbour_flooding_the_forward_does_not_stall_the_owner(fed):
    """Issue 16: another user of the node opens thousands of connections to the owner's -L
    port while the owner moves 128 MiB through it: every one is refused, the owner's transfer
    keeps going (no multi-second stall: the owner check is one kernel query, not a scan of
    every socket), and the owner's log gets a handful of lines, not one per refusal."""
    client = fed["client"]
    refused_before = client.counters()["connections_refused"]
    log_before = client.output().count("refused")
    bulk = subprocess.Popen(
        [
            "runuser",
            "-u",
            CLI,
            "--",
            sys.executable,
            "-c",
            TIMED_BULK,
            str(SINK_FWD),
            str(128 << 20),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    flood = as_user(OTHER, FLOOD, SINK_FWD, 5000, timeout=240)
    out, _ = bulk.communicate(timeout=240)
    verdict = json.loads(out)
    assert verdict["received"] == 128 << 20
    assert verdict["max_gap"] < 5, f"the owner's transfer stalled for {verdict['max_gap']:.1f}s"
    time.sleep(1.2)
    refused = client.counters()["connections_refused"] - refused_before
    assert refused >= flood["connected"] > 4000, (refused, flood)
    lines = client.output().count("refused") - log_before
    assert lines <= 2 + flood["seconds"] / 10 + 2, f"{lines} log lines for 5,000 refusals"


TLS_SERVER = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def serve(c):
    try:
        with ctx.wrap_socket(c, server_side=True) as t:
            t.recv(1)
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.mark.timeout(180)
def test_doctor_says_whether_the_server_answers_through_the_tunnel(fed, tmp_path):
    """`hpcfed doctor --tunnel-config C --server-ip IP --role ROLE`: this peer's own tunnel, a
    TLS handshake with whatever answers at the server's port. A TLS server answers; a port
    nothing listens on is closed; a non-TLS service is named as such; an address the hub does
    not route to (another client) gives no answer - each a FAIL line with what to check."""
    net = fed["net"]
    tls_port = 19443
    home = Path(pwd.getpwnam(SRV).pw_dir)
    key, cert = home / "probe-tls.key", home / "probe-tls.crt"
    made = run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=fl-server", "-keyout", str(key), "-out", str(cert)],
        user=SRV,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    tls = subprocess.Popen(
        ["runuser", "-u", SRV, "--", sys.executable, "-c", TLS_SERVER, str(tls_port),
         str(cert), str(key)],
        start_new_session=True,
    )  # fmt: skip
    srv2_conf, srv2_ip = peer_config(net, "server", "fl-server-tls", SRV)
    server2 = Tunnel(
        SRV, srv2_conf, "-R", f"9443=127.0.0.1:{tls_port}", "-R", f"9001=127.0.0.1:{ECHO_PORT}",
        name="srv-tls",
    )  # fmt: skip
    probe_conf, _ = peer_config(net, "client", "doctor-probe", CLI)
    other_conf, other_ip = peer_config(net, "client", "doctor-other", OTHER)
    other = Tunnel(OTHER, other_conf, "-R", f"9443=127.0.0.1:{tls_port}", name="doctor-other")
    srv2_ip, other_ip = srv2_ip.split("/")[0], other_ip.split("/")[0]

    def doctor(ip, *args):
        proc = hpcfed(
            "doctor", "--tunnel-config", probe_conf, "--server-ip", ip, *args, "--json",
            user=CLI, timeout=90,
        )  # fmt: skip
        rows = json.loads(proc.stdout) if proc.stdout.strip() else []
        return proc, rows

    try:
        server2.wait_ready()
        other.wait_ready()
        proc, rows = doctor(srv2_ip, "--port", "9443")
        assert proc.returncode == 0, (proc.stderr, rows)
        assert rows[0]["ok"] and "a TLS server answered" in rows[0]["detail"], rows
        proc, rows = doctor(srv2_ip, "--port", "9444", "--port", "9001")
        assert proc.returncode == 7, proc.stderr
        closed, echo = rows
        assert not closed["ok"] and "nothing listens on that port" in closed["detail"], rows
        assert not echo["ok"] and "not TLS" in echo["detail"], rows
        assert "hpcfed status" in closed["fix"]
        proc, rows = doctor(other_ip, "--port", "9443")
        assert proc.returncode == 7 and "no answer within" in rows[0]["detail"], rows
        # The role says which port: a Fed-BioMed node dials 50051 (nothing there: closed).
        proc, rows = doctor(srv2_ip, "--role", "node")
        assert [r["check"] for r in rows] == [f"server {srv2_ip}:50051"], rows
        bad = hpcfed("doctor", "--tunnel-config", probe_conf, "--server-ip", "fl-server", user=CLI)
        assert bad.returncode == 3 and "not an IPv4 tunnel address" in bad.stderr
        # A config the tunnel could not use is one line naming it, before any tunnel starts.
        missing = f"{probe_conf}.missing"
        bad = hpcfed("doctor", "--tunnel-config", missing, "--server-ip", srv2_ip, "--port",
                     "9443", user=CLI)  # fmt: skip
        assert bad.returncode == 3 and bad.stderr.strip().splitlines() == [
            f"hpcfed: error: {missing}: no such tunnel config file"
        ], bad.stderr
    finally:
        other.stop()
        server2.stop()
        os.killpg(tls.pid, signal.SIGKILL)
        tls.wait()
