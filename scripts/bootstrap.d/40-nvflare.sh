#!/usr/bin/env bash
# What the kit tests' real NVFlare dashboards need besides the `nvflare` extra (installed by
# 20-python.sh):
# - `zip`: the dashboard builds every startup kit with `zip -rq -P <pin>`.
# - NVFlare 2.5 as a second, legacy dashboard (API under /api/v1, signed kits): only the package,
#   without dependencies, in its own folder; tests run it on PYTHONPATH with the venv's Flask.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install zip
"$HPCFED_VENV/bin/python" -c 'import nvflare, gunicorn' 2>/dev/null \
    || "$HPCFED_VENV/bin/pip" install -q "nvflare>=2.5"
LEGACY=/opt/hpcfed/nvflare-2.5
if [ ! -f "$LEGACY/nvflare/dashboard/wsgi.py" ]; then
    rm -rf "$LEGACY.tmp"
    "$HPCFED_VENV/bin/pip" install -q --no-deps --target "$LEGACY.tmp" "nvflare==2.5.2"
    rm -rf "$LEGACY" && mv "$LEGACY.tmp" "$LEGACY"
fi
chmod -R a+rX "$LEGACY"
