#!/usr/bin/env bash
# The hpcfed package in a venv every user can run (jobs of non-root users call it too), built
# from Debian's python3 because the image's own Python lives under /root (mode 0700).
# HPCFED_EDITABLE=1 installs in editable mode (development); the default is a real wheel build,
# which is what users get.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if [ ! -x "$HPCFED_VENV/bin/python" ] || [ ! -x "$HPCFED_VENV/bin/pip" ]; then  # an interrupted venv has no pip
    /usr/bin/python3 -m venv "$HPCFED_VENV"
    "$HPCFED_VENV/bin/pip" install -q --upgrade pip
fi
chmod -R a+rX "$(dirname "$HPCFED_VENV")"
extras="${HPCFED_EXTRAS:-test,nvflare}"
if [ "${HPCFED_EDITABLE:-0}" = 1 ]; then
    "$HPCFED_VENV/bin/pip" install -q -e "$REPO_ROOT[$extras]"
else
    "$HPCFED_VENV/bin/pip" install -q "$REPO_ROOT[$extras]"
fi
chmod -R a+rX "$HPCFED_VENV"
"$HPCFED_VENV/bin/hpcfed" --version
