#!/usr/bin/env bash
# A real OpenSSH server for the SSH-runner tests (tests/test_ssh.py starts its own sshd on
# loopback with its own host key and config; no system service is enabled).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install openssh-server openssh-client
mkdir -p /run/sshd
chmod 0755 /run/sshd
