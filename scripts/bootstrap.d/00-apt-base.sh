#!/usr/bin/env bash
# Debian packages the Python package itself needs to build and run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install python3-venv python3-dev gcc ca-certificates
