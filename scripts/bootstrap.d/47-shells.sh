#!/usr/bin/env bash
# zsh and fish, so the completion tests (tests/test_completion.py) load `hpcfed completion zsh|fish`
# in the real shells, not only bash.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install zsh fish
