#!/usr/bin/env bash
# The WireGuard hub side for tests and benchmarks: wireguard-go (userspace, because kernel
# WireGuard is often absent), wg, ip (namespaces, veth), nft (the hub's forwarding policy) and
# iperf3 for bench_tunnel.py.
# Job-side peers need none of this: hpcfed's tunnel is a userspace peer inside the process.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install wireguard-go wireguard-tools iproute2 nftables iperf3 procps
