# Shared by the bootstrap steps (sourced, not run).
export DEBIAN_FRONTEND=noninteractive
HPCFED_VENV="${HPCFED_VENV:-/opt/hpcfed/venv}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# apt_install PKG...: install what is missing; `apt-get update` once per boot.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ ! -f /var/lib/apt/lists/.hpcfed-updated ] || [ -n "$(find /var/lib/apt/lists/.hpcfed-updated -mmin +720 2>/dev/null)" ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        touch /var/lib/apt/lists/.hpcfed-updated
    fi
    echo "installing: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The machine's own Debian mirror (never a host name written into the project); for debootstrap.
debian_mirror() {
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v -e security -e nodesource -e google | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' \
        | grep -v security | head -n1 || true)
    [ -n "$uri" ] || { echo "no Debian mirror found in /etc/apt/sources.list*" >&2; return 1; }
    echo "$uri"
}
