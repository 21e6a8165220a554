#!/usr/bin/env bash
# The Docker test cluster (`hpcfed testcluster up --engine docker`, tests marked `docker`):
# Docker Engine + Compose from Debian, and debootstrap for the images' base (no registry: every
# image is built locally from a debootstrap root file system). The images themselves are built
# by the tests' fixture (or `hpcfed testcluster up --engine docker`) and cached by content hash.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
apt_install docker.io docker-compose debootstrap iptables
if ! docker info >/dev/null 2>&1; then
    echo "60-docker: the Docker daemon does not answer (start it: service docker start);" \
        "the docker-marked tests need it" >&2
fi
