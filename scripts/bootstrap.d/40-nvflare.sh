#!/usr/bin/env bash
# What the kit tests' real NVFlare dashboard needs besides the `nvflare` extra (installed by
# 20-python.sh): it builds every startup kit with `zip -rq -P <pin>`, so the host needs `zip`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install zip
"$HPCFED_VENV/bin/python" -c 'import nvflare, gunicorn' 2>/dev/null \
    || "$HPCFED_VENV/bin/pip" install -q "nvflare>=2.5"
