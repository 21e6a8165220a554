"""hpcfed's userspace tunnel vs wireguard-go TUN peers, through the same hub, in one run.

Paths (both through one wireguard-go hub in a network namespace, interleaved run by run):
  1. hpcfed tunnel: client (-L) -> hub -> server (-R), two non-root users, no TUN device
  2. TUN-based WireGuard: two wireguard-go peers, each in its own netns with a TUN device (what
     needs root/NET_ADMIN in a job)
  plus plain loopback TCP once (the ceiling).

Per run and path: throughput of one bulk transfer, CPU-seconds per GiB of the two peers and of
the hub, datagrams per MiB the client peer sends (data direction) and the server peer sends
back (ACKs), bytes per data datagram, wire bytes per payload byte (headers + retransmissions),
and the median connect + 1-byte round trip of `--probes` new connections.
Reported: median and min-max over `--runs` runs (>= 5).

Run as root:  /opt/hpcfed/venv/bin/python benchmarks/bench_tunnel.py [--mib 256] [--runs 5]
Writes benchmarks/results/tunnel.md (+ tunnel.png with matplotlib) with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from test_tunnel_wireguard import (  # noqa: E402
    CLI,
    SRV,
    HubNet,
    Tunnel,
    _ensure_user,
    need_hub_tools,
    peer_config,
)

from benchmarks.machine import describe  # noqa: E402
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
secs = None
if mib:
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
print(json.dumps({"seconds": secs, "rtt_ms": statistics.median(lat) if lat else None}))
""".replace("import json,", "import statistics, json,")

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


def link_stats(ns: str, dev: str) -> dict:
    """Packet and byte counters of an interface in a namespace."""
    out = subprocess.run(
        ["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    st = json.loads(out)[0]["stats64"]
    return {
        "tx_packets": st["tx"]["packets"],
        "tx_bytes": st["tx"]["bytes"],
        "rx_packets": st["rx"]["packets"],
        "rx_bytes": st["rx"]["bytes"],
    }


class Path_:
    """One way from a client to the sink: how to run the sender there, and its counters."""

    def __init__(self, name, prefix, host, port, peer_pids, client_counters, server_counters):
        self.name, self.prefix, self.host, self.port = name, prefix, host, port
        self.peer_pids = peer_pids
        self.client_counters = client_counters  # -> {"tx_packets", "tx_bytes"} of the client peer
        self.server_counters = server_counters  # -> {"tx_packets"} of the server peer

    def send(self, mib: int, probes: int) -> dict:
        proc = subprocess.run(
            self.prefix
            + [sys.executable, "-c", SEND, self.host, str(self.port), str(mib), str(probes)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def udp_rcvbuf_errors(ns: str) -> int:
    """Datagrams the kernel dropped in a namespace because a UDP socket's buffer was full."""
    snmp = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    head, values = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")][:2]
    return int(values[head.index("RcvbufErrors")])


def one_run(path: Path_, hub_pids: list[int], hub_ns: str, mib: int, probes: int) -> dict:
    cpu_peers, cpu_hub = cpu_seconds(path.peer_pids), cpu_seconds(hub_pids)
    drops = udp_rcvbuf_errors(hub_ns)
    c0, s0 = path.client_counters(), path.server_counters()
    r = path.send(mib, 0)
    time.sleep(1.2)  # the hpcfed tunnel's status file is rewritten every second
    c1, s1 = path.client_counters(), path.server_counters()
    gib = mib / 1024
    data_pkts = c1["tx_packets"] - c0["tx_packets"]
    out = {
        "mbit": mib * 8 * 1.048576 / r["seconds"],
        "peers_cpu_per_gib": (cpu_seconds(path.peer_pids) - cpu_peers) / gib,
        "hub_cpu_per_gib": (cpu_seconds(hub_pids) - cpu_hub) / gib,
        "data_pkts_per_mib": data_pkts / mib,
        "ack_pkts_per_mib": (s1["tx_packets"] - s0["tx_packets"]) / mib,
        "bytes_per_data_pkt": (c1["tx_bytes"] - c0["tx_bytes"]) / max(1, data_pkts),
        "wire_per_payload": (c1["tx_bytes"] - c0["tx_bytes"]) / (mib << 20),
        "hub_drops_per_mib": (udp_rcvbuf_errors(hub_ns) - drops) / mib,
    }
    out["rtt_ms"] = path.send(0, probes)["rtt_ms"]
    return out


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


def tunnel_counters(t: Tunnel):
    def read() -> dict:
        st = t.counters()
        # WireGuard datagrams carry the IP packets; tx_bytes is their payload (IP packets)
        return {"tx_packets": st["tx_datagrams"], "tx_bytes": st["tx_bytes"]}

    return read


def wg_counters(ns: str, dev: str):
    return lambda: link_stats(ns, dev)


METRICS = [
    ("mbit", "throughput (Mbit/s)", "{:.0f}"),
    ("peers_cpu_per_gib", "both peers' CPU s per GiB", "{:.1f}"),
    ("hub_cpu_per_gib", "hub CPU s per GiB", "{:.1f}"),
    ("rtt_ms", "connect + 1-byte RTT (ms)", "{:.2f}"),
    ("data_pkts_per_mib", "data packets per MiB (client -> hub)", "{:.0f}"),
    ("ack_pkts_per_mib", "ACK packets per MiB (server -> hub)", "{:.0f}"),
    ("bytes_per_data_pkt", "IP bytes per data packet", "{:.0f}"),
    ("wire_per_payload", "IP bytes sent per payload byte", "{:.3f}"),
    ("hub_drops_per_mib", "datagrams the hub's full UDP socket dropped per MiB", "{:.1f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=256, help="MiB per throughput run (default 256)")
    ap.add_argument("--runs", type=int, default=5, help="runs per path, interleaved (>= 5)")
    ap.add_argument("--probes", type=int, default=50, help="connection setups timed per run")
    ap.add_argument("--buffer-kib", default="256", help="hpcfed tunnel's --buffer-kib")
    args = ap.parse_args()
    need_hub_tools()
    for u in (SRV, CLI):
        _ensure_user(u)
    net = HubNet("bench", 57)
    procs, tunnels, namespaces = [], [], []
    results: dict[str, list[dict]] = {}
    loopback = None
    try:
        net.create()
        net.hub("init", "--endpoint", net.endpoint, "--interface", net.iface)
        net.hub("up", "--userspace")
        hub_pids = pids_of(f"wireguard-go {net.iface}")

        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SINK, "127.0.0.1", "29500"], start_new_session=True
            )
        )
        # 1. hpcfed tunnel
        srv_conf, srv_ip = peer_config(net, "server", "bench-srv", SRV)
        cli_conf, _ = peer_config(net, "client", "bench-cli", CLI)
        procs.append(
            subprocess.Popen(
                ["runuser", "-u", SRV, "--", sys.executable, "-c", SINK, "127.0.0.1", "29501"],
                start_new_session=True,
            )
        )
        server = Tunnel(
            SRV,
            srv_conf,
            "-R",
            "9500=127.0.0.1:29501",
            "--buffer-kib",
            args.buffer_kib,
            name="bench-srv",
        )
        client = Tunnel(
            CLI,
            cli_conf,
            "-L",
            f"29502={srv_ip}:9500",
            "--buffer-kib",
            args.buffer_kib,
            name="bench-cli",
        )
        tunnels += [server, client]
        server.wait_ready()
        client.wait_ready()
        hpcfed_path = Path_(
            "hpcfed tunnel (userspace, -L/-R)",
            ["runuser", "-u", CLI, "--"],
            "127.0.0.1",
            29502,
            [server.proc.pid, client.proc.pid],
            tunnel_counters(client),
            tunnel_counters(server),
        )
        # 2. TUN-based wireguard-go peers
        ns_a, _ = tun_peer(net, "a", 58, "client")
        ns_b, ip_b = tun_peer(net, "b", 59, "server")
        namespaces += [ns_a, ns_b]
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns_b, sys.executable, "-c", SINK, ip_b, "29503"],
                start_new_session=True,
            )
        )
        time.sleep(1)
        tun_path = Path_(
            "wireguard-go TUN peers (root, netns)",
            ["ip", "netns", "exec", ns_a],
            ip_b,
            29503,
            pids_of("wireguard-go wgb"),
            wg_counters(ns_a, "wgba"),
            wg_counters(ns_b, "wgbb"),
        )
        time.sleep(0.5)
        loopback = Path_("loopback TCP", [], "127.0.0.1", 29500, [], dict, dict).send(
            args.mib * 4, args.probes
        )
        loopback["mbit"] = args.mib * 4 * 8 * 1.048576 / loopback["seconds"]
        load = [os.getloadavg()[0]]
        for i in range(args.runs):
            for path in (hpcfed_path, tun_path):
                r = one_run(path, hub_pids, net.ns, args.mib, args.probes)
                results.setdefault(path.name, []).append(r)
                print(f"run {i + 1} {path.name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
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
    write(results, loopback, args, load)


def summary(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def write(results: dict[str, list[dict]], loopback: dict | None, args, load: list) -> None:
    names = list(results)
    lines = [
        "# Tunnel benchmark: hpcfed's userspace tunnel vs wireguard-go TUN peers",
        "",
        f"Machine: {describe()}; shared with other work, so read absolute numbers as lower bounds.",
        f"Run: `python benchmarks/bench_tunnel.py --mib {args.mib} --runs {args.runs} "
        f"--probes {args.probes}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
        f"1-minute load average {load[0]:.1f} before the runs, {load[-1]:.1f} after (other "
        "work on the machine: absolute numbers vary, the interleaved ratio less).",
        "Both paths go through the same hub (Debian's wireguard-go in a network namespace, UDP "
        "socket at the kernel default), one bulk TCP transfer of "
        f"{args.mib} MiB client -> server per run, runs interleaved (hpcfed, TUN, hpcfed, ...). "
        "Held equal: hub, machine, payload, MTU 1420, one connection. CPU: user+system seconds "
        "of the processes per GiB moved. Packets: WireGuard datagrams the client peer sent (data) "
        "and the server peer sent (ACKs); bytes per packet are IP bytes inside WireGuard.",
        "",
        f"Median (min–max) of {args.runs} runs:",
        "",
        "| metric | " + " | ".join(names) + " | ratio (hpcfed / TUN, medians) |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for key, label, fmt in METRICS:
        cells = [summary([r[key] for r in results[n]], fmt) for n in names]
        meds = [statistics.median([r[key] for r in results[n]]) for n in names]
        ratio = f"{meds[0] / meds[1]:.2f}×" if len(meds) == 2 and meds[1] else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    if loopback:
        lines += [
            "",
            f"Ceiling, plain loopback TCP (one run of {args.mib * 4} MiB): "
            f"{loopback['mbit']:.0f} Mbit/s, connect + 1-byte RTT {loopback['rtt_ms']:.2f} ms.",
        ]
    out = HERE / "results" / "tunnel.md"
    out.parent.mkdir(exist_ok=True)
    raw = {n: results[n] for n in names}
    lines += ["", "Raw runs (JSON):", "", "```", json.dumps(raw, indent=1), "```"]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 12 + len(METRICS)]))
    plot(results, out.with_suffix(".png"))


def plot(results: dict[str, list[dict]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(no matplotlib: no plot; pip install hpcfed[bench])", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys_ = ["mbit", "peers_cpu_per_gib", "hub_cpu_per_gib", "rtt_ms"]
    fig, axes = plt.subplots(1, len(keys_), figsize=(14, 3.6))
    for ax, key in zip(axes, keys_):
        label = next(l for k, l, _ in METRICS if k == key)
        data = [[r[key] for r in results[n]] for n in results]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks([1, 2], ["hpcfed", "TUN peers"])
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
