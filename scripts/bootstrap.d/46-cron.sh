#!/usr/bin/env bash
# `crontab` for `hpcfed cron install --crontab` and its tests (Debian's slurm-client does not ship
# `scrontab`, so the user crontab is the fallback hpcfed uses here). The cron daemon is not started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install cron
