#!/usr/bin/env bash
# A real Apptainer on Debian 12, which does not package it: sid's binaries on a private glibc
# (facts: ../shared/notes/apptainer-on-bookworm.md). Installs into $APPTAINER_PREFIX with
# `apptainer` on PATH for every user via /usr/local/bin, makes /dev/fuse usable by non-root users
# (SIF mounts through squashfuse), and caches an offline bookworm base image for tests and demos.
# Idempotent; fails loudly when sid changed the package layout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PREFIX="${APPTAINER_PREFIX:-/opt/hpcfed/apptainer}"
CACHE="${HPCFED_IMAGE_CACHE:-/var/cache/hpcfed}"
ARCH_TRIPLET=x86_64-linux-gnu

die() { echo "30-apptainer: $*" >&2; exit 1; }

apt_install patchelf squashfs-tools squashfuse fuse2fs fuse-overlayfs uidmap \
    containernetworking-plugins ca-certificates libcap2-bin debootstrap

install_apptainer() {
    local work mirror
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    mirror=$(debian_mirror)
    # A private apt configuration: download from sid without touching /etc/apt.
    mkdir -p "$work/etc/preferences.d" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
    : >"$work/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/etc/sources.list"
    cat >"$work/apt.conf" <<EOF
Dir::Etc "$work/etc";
Dir::Etc::SourceList "$work/etc/sources.list";
Dir::Etc::SourceParts "$work/etc/sources.list.d";
Dir::State::Lists "$work/lists";
Dir::State::status "$work/status";
Dir::Cache "$work/cache";
Acquire::Check-Valid-Until "false";
APT::Architecture "amd64";
EOF
    export APT_CONFIG="$work/apt.conf"
    apt-get -qq update
    (cd "$work/debs" && apt-get -qq download apptainer libc6 libseccomp2 libsqlite3-0)
    unset APT_CONFIG
    local stage="$work/stage" libs="$work/libs"
    mkdir -p "$stage" "$libs"
    dpkg-deb -x "$work"/debs/apptainer_*.deb "$stage"
    for deb in "$work"/debs/libc6_*.deb "$work"/debs/libseccomp2_*.deb "$work"/debs/libsqlite3-0_*.deb; do
        dpkg-deb -x "$deb" "$libs"
    done

    # Check the layout we rely on before changing anything in PREFIX.
    [ -x "$stage/usr/bin/apptainer" ] || die "sid's apptainer has no usr/bin/apptainer: layout changed"
    [ -x "$stage/usr/lib/$ARCH_TRIPLET/apptainer/bin/starter" ] \
        || die "sid's apptainer has no usr/lib/$ARCH_TRIPLET/apptainer/bin/starter: layout changed"
    [ -f "$stage/etc/apptainer/apptainer.conf" ] || die "sid's apptainer has no etc/apptainer/apptainer.conf"
    local ld libdir
    ld=$(find "$libs" -name 'ld-linux-x86-64.so.2' \( -type f -o -type l \) | head -n1)
    [ -n "$ld" ] || die "sid's libc6 has no ld-linux-x86-64.so.2"
    libdir=$(dirname "$(find "$libs" -name 'libc.so.6' | head -n1)")
    [ -f "$libdir/libc.so.6" ] || die "sid's libc6 has no libc.so.6"

    local new="$PREFIX.new"
    rm -rf "$new"
    mkdir -p "$new/bin" "$new/libexec" "$new/lib/$ARCH_TRIPLET" "$new/etc" "$new/var/lib/apptainer/mnt/session" "$new/glibc"
    cp -a "$stage/usr/bin/apptainer" "$new/bin/"
    cp -a "$stage/usr/lib/$ARCH_TRIPLET/apptainer" "$new/libexec/apptainer"
    # The relocation logic finds libexec from bin/../lib/<triplet>/apptainer.
    ln -s ../../libexec/apptainer "$new/lib/$ARCH_TRIPLET/apptainer"
    cp -a "$stage/etc/apptainer" "$new/etc/apptainer"
    cp -aL "$libdir"/. "$new/glibc/"
    cp -aL "$ld" "$new/glibc/ld-linux-x86-64.so.2"
    # DT_RPATH, not RUNPATH: apptainer sets LD_LIBRARY_PATH to host libs for its sandboxed
    # unsquashfs, and RUNPATH would lose to it (`version 'GLIBC_2.38' not found`).
    for bin in "$new/bin/apptainer" "$new/libexec/apptainer/bin/starter"; do
        patchelf --set-interpreter "$PREFIX/glibc/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$PREFIX/glibc" "$bin"
    done
    for lib in "$new"/glibc/libsqlite3.so.0* "$new"/glibc/libseccomp.so.2*; do
        [ -L "$lib" ] || patchelf --force-rpath --set-rpath "$PREFIX/glibc" "$lib"
    done
    rm -rf "$PREFIX.old"
    [ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
    mv "$new" "$PREFIX"
    rm -rf "$PREFIX.old"
}

if ! "$PREFIX/bin/apptainer" --version >/dev/null 2>&1; then
    echo "installing Apptainer from Debian sid into $PREFIX"
    install_apptainer
fi

# Configuration (re-applied every run, so a changed host is picked up).
conf="$PREFIX/etc/apptainer/apptainer.conf"
set_conf() {  # set_conf KEY VALUE: replace the (possibly commented) key, or append it
    if grep -qE "^#? *$1 *=" "$conf"; then
        sed -i -E "s|^#? *$1 *=.*|$1 = $2|" "$conf"
    else
        echo "$1 = $2" >>"$conf"
    fi
}
set_conf "cni configuration path" "/etc/cni/net.d"
set_conf "cni plugin path" "/usr/lib/cni"
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || set_conf "systemd cgroups" "no"
# Root may lack capabilities in its bounding set (here CAP_SYS_RESOURCE): grant root only the
# ones that exist, or every root container fails with `Requesting capability set ...`.
bounding=$(capsh --print | sed -n 's/^Bounding set =//p')
[ -n "$bounding" ] || die "cannot read the capability bounding set (capsh --print)"
"$PREFIX/bin/apptainer" -s capability add --user root "$bounding" >/dev/null 2>&1
set_conf "root default capabilities" "file"

ln -sfn "$PREFIX/bin/apptainer" /usr/local/bin/apptainer
chmod -R a+rX "$PREFIX"
# Non-root SIF mounts go through squashfuse_ll; without access to /dev/fuse apptainer extracts
# the whole image on every exec (~8 s instead of 0.4 s). 0666 is the usual mode on real systems.
[ -c /dev/fuse ] && chmod 0666 /dev/fuse

version=$(apptainer --version) || die "apptainer does not run after installing"
case "$version" in
    "apptainer version "*) echo "$version" ;;
    *) die "unexpected 'apptainer --version' output: $version" ;;
esac

# Offline base for tests and demos: a bookworm minbase rootfs with python3, as a SIF.
# Built once and cached; `hpcfed image build ROLE --base localimage:$CACHE/base-bookworm.sif`.
base_sif="$CACHE/base-bookworm.sif"
if [ ! -s "$base_sif" ]; then
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$base_sif.tmp"' EXIT
    echo "debootstrap: bookworm minbase with python3 (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$(debian_mirror)" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # A directory build runs no %post, so root's missing capabilities do not matter here.
    apptainer -s build --force --mksquashfs-args "-comp zstd -Xcompression-level 1" "$base_sif.tmp" "$rootfs"
    mv "$base_sif.tmp" "$base_sif"
    rm -rf "$rootfs"
    trap - EXIT
fi
chmod 0755 "$CACHE"
chmod 0644 "$base_sif"
echo "offline base image: $base_sif"
