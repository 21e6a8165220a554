"""Apply the registry to a live WireGuard interface with `ip` and `wg` (root on the hub machine).

Secrets go to `wg` on stdin (`private-key /dev/stdin`), never on the command line. Kernel
WireGuard is used when the kernel has it; otherwise wireguard-go (userspace, needs /dev/net/tun).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from hpcfed.errors import EnvironmentProblem
from hpcfed.hub.registry import HUB_ADDRESS, PREFIXES, Hub, Peer


def _run(
    argv: Sequence[str], input: Optional[str] = None, check: bool = True
) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise EnvironmentProblem(
            f"`{argv[0]}` is not installed (hub needs wireguard-tools and iproute2)"
        )
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise EnvironmentProblem(
            f"`{' '.join(argv)}` failed: {msg[-1] if msg else proc.returncode}"
        )
    return proc


def is_live(interface: str) -> bool:
    return (
        shutil.which("wg") is not None
        and _run(["wg", "show", interface], check=False).returncode == 0
    )


def up(hub: Hub, private_key: str, peers: Sequence[Peer], userspace: bool = False) -> str:
    """Create the interface if needed and make it match the registry. Returns the implementation."""
    impl = "existing"
    if not is_live(hub.interface):
        impl = _create(hub.interface, userspace)
    _run(
        [
            "wg",
            "set",
            hub.interface,
            "private-key",
            "/dev/stdin",
            "listen-port",
            str(hub.listen_port),
        ],
        input=private_key + "\n",
    )
    addrs = _run(["ip", "-o", "-4", "addr", "show", "dev", hub.interface]).stdout
    if str(HUB_ADDRESS) not in addrs:
        _run(["ip", "addr", "add", str(HUB_ADDRESS), "dev", hub.interface])
    _run(["ip", "link", "set", hub.interface, "up"])
    # The hub routes between peers: packets from one peer leave again through the same
    # interface. The policy first, so forwarding is never on without it.
    apply_policy(hub.interface)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    sync(hub, peers)
    return impl


def _table(interface: str) -> str:
    return "hpcfed_" + re.sub(r"[^A-Za-z0-9_]", "_", interface)


def policy_rules(interface: str) -> str:
    """nftables rules for the hub: what a federation needs and nothing else.

    - any peer may open connections to a *server* address (clients and admins reach the FL
      server's forwards); replies flow back (connection tracking);
    - peers may not open connections to clients or admins (one site cannot reach another) nor
      to the hub itself (only ping), and nothing from the hub's other networks enters the
      tunnel network.
    TCP segments from servers that do not open a connection pass without connection tracking:
    a busy transfer must not stall on a segment conntrack's window check calls invalid.
    """
    servers = PREFIXES["server"]
    return f"""table inet {_table(interface)} {{}}
delete table inet {_table(interface)}
table inet {_table(interface)} {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{interface}" ct state established,related accept
    iifname "{interface}" oifname "{interface}" ip daddr {servers} ip daddr != {HUB_ADDRESS.ip} accept
    iifname "{interface}" oifname "{interface}" ip saddr {servers} tcp flags & (syn | ack) != syn accept
    iifname "{interface}" counter drop
    oifname "{interface}" ct state established,related accept
    oifname "{interface}" counter drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{interface}" ct state established,related accept
    iifname "{interface}" icmp type echo-request accept
    iifname "{interface}" counter drop
  }}
}}
"""


def apply_policy(interface: str) -> None:
    if shutil.which("nft") is None:
        raise EnvironmentProblem(
            "`nft` is not installed: the hub needs nftables for its forwarding policy "
            "(apt-get install nftables)"
        )
    _run(["nft", "-f", "-"], input=policy_rules(interface))


def remove_policy(interface: str) -> None:
    if shutil.which("nft") is not None:
        _run(["nft", "delete", "table", "inet", _table(interface)], check=False)


def _create(interface: str, userspace: bool) -> str:
    if (
        not userspace
        and _run(["ip", "link", "add", interface, "type", "wireguard"], check=False).returncode == 0
    ):
        return "kernel"
    if shutil.which("wireguard-go") is None:
        raise EnvironmentProblem("no kernel WireGuard here and wireguard-go is not installed")
    # wireguard-go daemonises itself; it exits when the interface is deleted.
    _run(["wireguard-go", interface])
    return "wireguard-go"


def down(interface: str) -> bool:
    if not is_live(interface):
        return False
    _run(["ip", "link", "del", interface])
    remove_policy(interface)
    return True


def live_peers(interface: str) -> dict[str, dict]:
    """Public key -> endpoint, latest handshake (epoch s), transfer; empty when not live."""
    if not is_live(interface):
        return {}
    out = {}
    for line in _run(["wg", "show", interface, "dump"]).stdout.splitlines()[1:]:
        f = line.split("\t")
        if len(f) >= 8:
            out[f[0]] = {
                "endpoint": None if f[2] == "(none)" else f[2],
                "allowed_ips": f[3],
                "latest_handshake": int(f[4]) or None,
                "rx_bytes": int(f[5]),
                "tx_bytes": int(f[6]),
            }
    return out


def set_peer(hub: Hub, peer: Peer, key: str) -> None:
    argv = [
        "wg",
        "set",
        hub.interface,
        "peer",
        key,
        "preshared-key",
        "/dev/stdin",
        "allowed-ips",
        f"{peer.address}/32",
    ]
    if hub.keepalive:
        argv += ["persistent-keepalive", str(hub.keepalive)]
    _run(argv, input=peer.psk + "\n")


def remove_peer(hub: Hub, key: str) -> None:
    _run(["wg", "set", hub.interface, "peer", key, "remove"])


def sync(hub: Hub, peers: Sequence[Peer]) -> None:
    """Make the live interface's peers exactly the registry's (keys not registered are dropped)."""
    wanted = {k: p for p in peers for k in p.keys}
    for key in set(live_peers(hub.interface)) - set(wanted):
        remove_peer(hub, key)
    for key, peer in wanted.items():
        set_peer(hub, peer, key)
