"""Tunnel throughput, CPU per GB and connection setup, side by side on one machine.

  1. hpcfed tunnel: client (-L) -> wireguard-go hub in a netns -> server (-R), two non-root users
  2. TUN-based WireGuard: two wireguard-go peers, each in its own netns with a TUN device (what
     needs root/NET_ADMIN in a job), through the same hub
  3. plain loopback TCP (the ceiling)

Run as root:  /opt/hpcfed/venv/bin/python benchmarks/bench_tunnel.py [--mib 512]
Writes benchmarks/results/tunnel.md with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_tunnel_wireguard import (  # noqa: E402
    CLI,
    SRV,
    HubNet,
    Tunnel,
    _ensure_user,
    need_hub_tools,
    peer_config,
)

from hpcfed.tunnel import keys  # noqa: E402

SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
while True:
    c, _ = s.accept()
    first = c.recv(1)
    if first == b"p":              # latency probe: answer one byte
        c.sendall(b"p"); c.close(); continue
    n = len(first)
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""

# Sends `mib` MiB, reports wall time; then `probes` connection setups (connect + 1-byte RTT).
SEND = r"""
import json, socket, sys, time
host, port, mib, probes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
block = b"x" * (1 << 20)
c = socket.create_connection((host, port), timeout=300)
t = time.monotonic()
for _ in range(mib): c.sendall(block)
c.shutdown(socket.SHUT_WR)
n = int(c.recv(64)); secs = time.monotonic() - t
assert n == mib << 20, n
lat = []
for _ in range(probes):
    t0 = time.monotonic()
    p = socket.create_connection((host, port), timeout=30); p.sendall(b"p"); assert p.recv(1) == b"p"; p.close()
    lat.append((time.monotonic() - t0) * 1000)
lat.sort()
print(json.dumps({"seconds": secs, "mbit": mib * 8 * 1.048576 / secs, "setup_ms_median": lat[len(lat)//2], "setup_ms_p90": lat[int(len(lat)*0.9)]}))
"""

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / TICK
        except OSError:
            pass
    return total


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def measure(
    prefix: list[str],
    host: str,
    port: int,
    mib: int,
    probes: int,
    cpu_pids: list[int],
    peer_pids: list[int] = (),
) -> dict:
    before = cpu_seconds(cpu_pids)
    before_peers = cpu_seconds(list(peer_pids))
    proc = subprocess.run(
        prefix + [sys.executable, "-c", SEND, host, str(port), str(mib), str(probes)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    r["cpu_s_per_gb"] = (cpu_seconds(cpu_pids) - before) / (mib / 1024) if cpu_pids else None
    r["peers_cpu_s_per_gb"] = (
        (cpu_seconds(list(peer_pids)) - before_peers) / (mib / 1024) if peer_pids else None
    )
    return r


def tun_peer(net: HubNet, name: str, subnet: int, type_: str) -> tuple[str, str]:
    """A wireguard-go peer with a TUN device in its own namespace, linked to the hub namespace."""
    ns, veth = f"hpcfed-b{name}", f"vb{name}{subnet}"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", veth + "a", "type", "veth", "peer", "name", veth + "b")
    sh("ip", "link", "set", veth + "a", "netns", ns)
    sh("ip", "link", "set", veth + "b", "netns", net.ns)
    sh("ip", "-n", ns, "addr", "add", f"10.197.{subnet}.1/30", "dev", veth + "a")
    sh("ip", "-n", net.ns, "addr", "add", f"10.197.{subnet}.2/30", "dev", veth + "b")
    for n, v in ((ns, veth + "a"), (net.ns, veth + "b"), (ns, "lo")):
        sh("ip", "-n", n, "link", "set", v, "up")
    info = json.loads(net.hub("genconf", type_, f"tun-{name}", "--json").stdout)
    conf = Path(info["config"]).read_text()
    psk = next(
        l.split("=", 1)[1].strip() for l in conf.splitlines() if l.startswith("PresharedKey")
    )
    hub_pub = next(
        l.split("=", 1)[1].strip() for l in conf.splitlines() if l.startswith("PublicKey")
    )
    private = keys.generate_private()
    iface = f"wgb{name}"
    sh("ip", "netns", "exec", ns, "wireguard-go", iface)
    subprocess.run(
        ["ip", "netns", "exec", ns, "wg", "set", iface, "private-key", "/dev/stdin"],
        input=private,
        text=True,
        check=True,
    )
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            iface,
            "peer",
            hub_pub,
            "preshared-key",
            "/dev/stdin",
            "endpoint",
            f"10.197.{subnet}.2:51820",
            "allowed-ips",
            "10.220.0.0/14",
            "persistent-keepalive",
            "25",
        ],
        input=psk,
        text=True,
        check=True,
    )
    sh("ip", "-n", ns, "addr", "add", f"{info['address']}/32", "dev", iface)
    sh("ip", "-n", ns, "link", "set", iface, "up")
    sh("ip", "-n", ns, "route", "add", "10.220.0.0/14", "dev", iface)
    net.hub("add", type_, f"tun-{name}", keys.public_from_private(private))
    return ns, info["address"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=512, help="MiB per throughput run (default 512)")
    ap.add_argument("--probes", type=int, default=50, help="connection setups to time per path")
    ap.add_argument("--buffer-kib", default="256", help="hpcfed tunnel's --buffer-kib")
    ap.add_argument("--skip-tun", action="store_true", help="only loopback and the hpcfed tunnel")
    args = ap.parse_args()
    need_hub_tools()
    for u in (SRV, CLI):
        _ensure_user(u)
    net = HubNet("bench", 57)
    procs, tunnels, namespaces = [], [], []
    results = {}
    try:
        net.create()
        net.hub("init", "--endpoint", net.endpoint, "--interface", net.iface)
        net.hub("up", "--userspace")
        hub_pids = pids_of(f"wireguard-go {net.iface}")

        # 3. plain loopback
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SINK, "127.0.0.1", "39500"], start_new_session=True
            )
        )
        time.sleep(0.5)
        results["loopback TCP"] = measure([], "127.0.0.1", 39500, args.mib * 4, args.probes, [])

        # 1. hpcfed tunnel
        srv_conf, srv_ip = peer_config(net, "server", "bench-srv", SRV)
        cli_conf, _ = peer_config(net, "client", "bench-cli", CLI)
        procs.append(
            subprocess.Popen(
                ["runuser", "-u", SRV, "--", sys.executable, "-c", SINK, "127.0.0.1", "39501"],
                start_new_session=True,
            )
        )
        server = Tunnel(
            SRV,
            srv_conf,
            "-R",
            "9500=127.0.0.1:39501",
            "--buffer-kib",
            args.buffer_kib,
            name="bench-srv",
        )
        client = Tunnel(
            CLI,
            cli_conf,
            "-L",
            f"39502={srv_ip}:9500",
            "--buffer-kib",
            args.buffer_kib,
            name="bench-cli",
        )
        tunnels += [server, client]
        server.wait_ready()
        client.wait_ready()
        tpids = [server.proc.pid, client.proc.pid]
        r = measure(
            ["runuser", "-u", CLI, "--"],
            "127.0.0.1",
            39502,
            args.mib,
            args.probes,
            tpids + hub_pids,
            tpids,
        )
        time.sleep(1.5)
        st = json.loads(client.status.read_text())
        r["wire_ratio"] = st["tx_bytes"] / (args.mib << 20)
        print("client tunnel tx/payload:", round(r["wire_ratio"], 3), file=sys.stderr)
        results["hpcfed tunnel (userspace, -L/-R)"] = r

        # 2. TUN-based wireguard-go peers
        if args.skip_tun:
            return
        ns_a, _ = tun_peer(net, "a", 58, "client")
        ns_b, ip_b = tun_peer(net, "b", 59, "server")
        namespaces += [ns_a, ns_b]
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns_b, sys.executable, "-c", SINK, ip_b, "39503"],
                start_new_session=True,
            )
        )
        time.sleep(1)
        peer_pids = pids_of("wireguard-go wgb")
        results["wireguard-go TUN peers (root, netns)"] = measure(
            ["ip", "netns", "exec", ns_a],
            ip_b,
            39503,
            args.mib,
            args.probes,
            peer_pids + hub_pids,
            peer_pids,
        )
    finally:
        for t in tunnels:
            t.stop()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for ns in namespaces:
            for link in subprocess.run(
                ["ip", "-n", ns, "-o", "link"], capture_output=True, text=True
            ).stdout.splitlines():
                name = link.split(":")[1].strip().split("@")[0]
                if name.startswith("wgb"):
                    subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        net.destroy()
        write(results, args)


def write(results: dict, args) -> None:
    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ),
        "?",
    )
    lines = [
        "# Tunnel benchmark",
        "",
        f"Machine: {os.cpu_count()} vCPU ({cpu}), {platform.system()} {platform.release()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; shared with other work, so lower bounds.",
        f"Run: `python benchmarks/bench_tunnel.py --mib {args.mib} --probes {args.probes}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "Hub: Debian's wireguard-go in a network namespace (its UDP socket at the 208 KiB default).",
        "CPU per GB: user+system seconds of the WireGuard processes (both peers + hub) per GiB moved.",
        "",
        "| path | Mbit/s | CPU s per GiB (peers + hub) | of which the two peers | connect+1-byte RTT median / p90 (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cpu_s = "-" if r.get("cpu_s_per_gb") is None else f"{r['cpu_s_per_gb']:.1f}"
        peers = "-" if r.get("peers_cpu_s_per_gb") is None else f"{r['peers_cpu_s_per_gb']:.1f}"
        lines.append(
            f"| {name} | {r['mbit']:.0f} | {cpu_s} | {peers} | {r['setup_ms_median']:.2f} / {r['setup_ms_p90']:.2f} |"
        )
    out = HERE / "results" / "tunnel.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
