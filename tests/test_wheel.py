"""The binary wheel (`make wheel`) on a login node that has no Rust and an older userland.

The wheel is built by `make wheel` (abi3, manylinux_2_28, zig-linked) and installed with plain
pip into a Debian 11 (bullseye: glibc 2.31, Python 3.9) root file system from
`debootstrap --variant=minbase`, run as a Docker container (`docker import` of the rootfs: no
registry) with no cargo or rustc anywhere. pip fetches the dependencies from PyPI for Python
3.9. Then what a user does first: `hpcfed --version`, `hpcfed submit --dry-run` with their own
site profile, and the Rust tunnel for real: one that finds no hub fails with its one-line error,
and two tunnels peered with each other carry an HTTP request from an -L port to an -R service.

The rootfs is cached as a tarball under /var/cache/hpcfed/rootfs/, named after a hash of its
recipe, and imported once per machine as a Docker image tagged with the same hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from helpers import need, run

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HPCFED_IMAGE_CACHE", "/var/cache/hpcfed"))
# The build tools' venv (maturin, ziglang, auditwheel), kept across test runs.
WHEEL_TOOLS = CACHE / "wheel-tools"
POLICY = "manylinux_2_28_x86_64"
# The older login node: Debian 11, glibc 2.31, Python 3.9 (what this recipe must give).
SUITE = "bullseye"
INCLUDE = ("python3", "python3-venv", "ca-certificates")
RECIPE = f"debootstrap --variant=minbase --include={','.join(INCLUDE)} {SUITE}"
VENV = "/opt/hpcfed/venv"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def recipe_key() -> str:
    return hashlib.sha256(RECIPE.encode()).hexdigest()[:12]


def debian_mirror() -> str:
    """The machine's own Debian mirror (scripts/bootstrap.d/lib.sh finds it for every step)."""
    proc = run(["bash", "-c", f"source {REPO}/scripts/bootstrap.d/lib.sh && debian_mirror"])
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`make wheel` into a fresh directory: the one x86_64 wheel it writes."""
    need(shutil.which("cargo") is not None, "building the wheel needs cargo")
    out = tmp_path_factory.mktemp("dist")
    env = {
        "WHEEL_DIR": str(out),
        "WHEEL_TOOLS": str(WHEEL_TOOLS),
        "WHEEL_ARCHS": "x86_64",
        # maturin's zig linker wrappers live in the cache dir; a per-test one would change the
        # linker path and make cargo rebuild every crate on each run.
        "XDG_CACHE_HOME": str(CACHE / "wheel-build-cache"),
    }
    proc = run(["make", "-C", str(REPO), "wheel"], env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = sorted(out.glob("hpcfed-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def bullseye_image() -> str:
    """A Docker image of the bullseye rootfs, built (debootstrap, ~1-2 min) only once."""
    need(os.geteuid() == 0, "debootstrap and Docker need root")
    need(shutil.which("debootstrap") is not None, "debootstrap (scripts/bootstrap installs it)")
    need(shutil.which("docker") is not None, "docker (the engine runs the bullseye rootfs)")
    need(run(["docker", "info"]).returncode == 0, "a running Docker engine")
    tag = f"hpcfed-wheeltest:{SUITE}-{recipe_key()}"
    if run(["docker", "image", "inspect", tag]).returncode == 0:
        return tag
    tarball = CACHE / "rootfs" / f"{SUITE}-minbase-{recipe_key()}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"hpcfed-rootfs-{SUITE}-") as root:
            t0 = time.monotonic()
            argv = RECIPE.split() + [root, debian_mirror()]
            proc = run(argv, timeout=1200)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (Path(root) / junk).glob("*.deb"):
                    entry.unlink()
            partial = tarball.with_suffix(f".{uuid.uuid4().hex}.tmp")
            proc = run(["tar", "-C", root, "-cf", str(partial), "."], timeout=600)
            assert proc.returncode == 0, proc.stderr
            os.replace(partial, tarball)
            print(f"debootstrap {SUITE} + tar: {time.monotonic() - t0:.0f} s")
    proc = run(["docker", "import", str(tarball), tag], timeout=600)
    assert proc.returncode == 0, proc.stderr
    return tag


class Container:
    """One running container of the image; exec() runs a shell snippet in it."""

    def __init__(self, image: str, wheel_dir: Path):
        self.name = f"hpcfed-wheeltest-{uuid.uuid4().hex[:8]}"
        proc = run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                self.name,
                "-v",
                f"{wheel_dir}:/wheel:ro",
                # This machine's trust store (pip reaches PyPI through whatever TLS setup the
                # machine has), as a login node's admin would configure pip's certificate bundle.
                "-v",
                f"{HOST_CA_BUNDLE}:/etc/ssl/certs/host-ca-bundle.crt:ro",
                "-e",
                "PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt",
                # PATH without /root/.cargo: no Rust toolchain exists in the image anyway
                "-e",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                image,
                "sleep",
                "1800",
            ],
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr

    def exec(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(["docker", "exec", self.name, "bash", "-c", script], timeout=timeout)

    def remove(self) -> None:
        run(["docker", "rm", "-f", self.name], timeout=120)


@pytest.fixture(scope="module")
def installed(bullseye_image, wheel):
    """The container with hpcfed installed from the wheel into a venv by plain pip."""
    box = Container(bullseye_image, wheel.parent)
    try:
        proc = box.exec(
            f"python3 -m venv {VENV} && {VENV}/bin/pip install --no-cache-dir /wheel/{wheel.name}",
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        box.pip_output = proc.stdout  # type: ignore[attr-defined]
        yield box
    finally:
        box.remove()


def test_the_wheel_is_abi3_manylinux_2_28_with_the_extension_and_data(wheel):
    assert wheel.name.endswith(f"-cp39-abi3-{POLICY}.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "hpcfed/_tunnel.abi3.so",
        "hpcfed/site_profiles/generic.yaml",
        "hpcfed/sbatch_templates/job.sbatch.j2",
        "hpcfed/frameworks/roles.yaml",
        "hpcfed/py.typed",
    ):
        assert needed in names, needed
    report = " ".join(
        run([str(WHEEL_TOOLS / "bin" / "auditwheel"), "show", str(wheel)]).stdout.split()
    )
    assert f'consistent with the following platform tag: "{POLICY}"' in report, report
    # Independently of auditwheel: no glibc symbol newer than 2.28 in the extension.
    with tempfile.TemporaryDirectory() as tmp:
        so = zipfile.ZipFile(wheel).extract("hpcfed/_tunnel.abi3.so", tmp)
        syms = run(["readelf", "--dyn-syms", "--wide", so]).stdout
    versions = {tuple(map(int, v.split("."))) for v in re.findall(r"@GLIBC_(\d+\.\d+)", syms)}
    assert versions and max(versions) <= (2, 28), sorted(versions)


def test_pip_installs_it_without_rust_on_python_3_9_and_glibc_2_31(installed, wheel):
    proc = installed.exec(
        "command -v cargo rustc rustup || echo no-rust; ldd --version | head -n1; python3 -V"
    )
    assert "no-rust" in proc.stdout and "/cargo" not in proc.stdout, proc.stdout
    assert "2.31" in proc.stdout.splitlines()[1] and "Python 3.9." in proc.stdout, proc.stdout
    # pip took the binary wheel as it is: nothing was compiled
    assert "Building wheel for hpcfed" not in installed.pip_output
    assert f"Processing /wheel/{wheel.name}" in installed.pip_output, installed.pip_output[-2000:]
    proc = installed.exec(f"{VENV}/bin/hpcfed --version")
    assert proc.returncode == 0 and proc.stdout.startswith("hpcfed, version "), proc


SITE_PROFILE = """\
# A user's own site on an older login node (no cluster needed for a dry run).
extends: generic
description: RHEL 8 style cluster
account: fedlab
partitions:
  default: gpu
gpus:
  dialect: gres
  types: [a100]
  default_type: a100
  max_per_node: 4
"""


def test_submit_dry_run_with_a_site_profile_of_the_user(installed):
    proc = installed.exec(
        "mkdir -p ~/.config/hpcfed/sites && cat > ~/.config/hpcfed/sites/rocky8.yaml <<'EOF'\n"
        f"{SITE_PROFILE}EOF\n"
        f"{VENV}/bin/hpcfed submit client --site rocky8 --gpus 2 --command 'nvidia-smi -L' --dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash"), proc.stdout[:300]
    for line in (
        "#SBATCH --gres=gpu:a100:2",
        "#SBATCH --account=fedlab",
        "#SBATCH --partition=gpu",
    ):
        assert line in proc.stdout, proc.stdout
    # and a bad request is still one line with its exit code, no traceback
    proc = installed.exec(
        f"{VENV}/bin/hpcfed submit client --site rocky8 --gpus 9 --command true --dry-run"
    )
    assert proc.returncode == 3, proc
    assert proc.stderr.startswith("hpcfed: error: --gpus 9:") and proc.stderr.count("\n") == 1


def test_the_rust_extension_imports(installed):
    proc = installed.exec(
        f"cd / && {VENV}/bin/python -c 'import hpcfed._tunnel as t; print(t.__file__)'"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("site-packages/hpcfed/_tunnel.abi3.so"), proc.stdout


# Two peers of one another on the container's loopback: A forwards 127.0.0.1:9000 to B's
# tunnel address, B carries that port to a local HTTP server. Keys by `hpcfed vpn keygen`.
TWO_PEERS = r"""
set -eu
H={venv}/bin/hpcfed
cd /tmp && mkdir -p peers srv && echo hello-through-the-tunnel > srv/hello.txt
conf() {{ # name address listen-port peer-port peer-address
    printf '[Interface]\nAddress = %s/24\nListenPort = %s\n\n[Peer]\nEndpoint = 127.0.0.1:%s\nAllowedIPs = %s/32\nPersistentKeepalive = 5\n' "$2" "$3" "$4" "$5" > peers/$1.conf
    chmod 600 peers/$1.conf
}}
conf a 10.77.0.1 51801 51802 10.77.0.2
conf b 10.77.0.2 51802 51801 10.77.0.1
pub_a=$($H vpn keygen --config peers/a.conf)
pub_b=$($H vpn keygen --config peers/b.conf)
sed -i "s|^\[Peer\]|[Peer]\nPublicKey = $pub_b|" peers/a.conf
sed -i "s|^\[Peer\]|[Peer]\nPublicKey = $pub_a|" peers/b.conf
(cd srv && exec python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1) &
$H tunnel up --config peers/b.conf -R 8000=127.0.0.1:8000 --ready-file /tmp/b.ready --handshake-timeout 30 2>/tmp/b.err &
$H tunnel up --config peers/a.conf -L 127.0.0.1:9000=10.77.0.2:8000 --ready-file /tmp/a.ready --handshake-timeout 30 2>/tmp/a.err &
for i in $(seq 100); do [ -e /tmp/a.ready ] && [ -e /tmp/b.ready ] && break; sleep 0.2; done
ls /tmp/a.ready /tmp/b.ready
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:9000/hello.txt", timeout=20).read().decode().strip())'
kill $(jobs -p) 2>/dev/null || true
wait 2>/dev/null || true
"""


def test_two_tunnels_handshake_and_carry_a_request(installed):
    proc = installed.exec(TWO_PEERS.format(venv=VENV), timeout=120)
    err = installed.exec("cat /tmp/a.err /tmp/b.err").stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr + err
    assert proc.stdout.strip().splitlines()[-1] == "hello-through-the-tunnel", proc.stdout + err


def test_a_tunnel_that_finds_no_hub_fails_with_one_line(installed):
    # The hub endpoint is a loopback port where nothing answers: no handshake within 2 s.
    proc = installed.exec(
        "cd /tmp && mkdir -p lone && cd lone && "
        "printf '[Interface]\\nAddress = 10.78.0.1/24\\n\\n[Peer]\\nEndpoint = 127.0.0.1:51899\\n"
        "AllowedIPs = 10.78.0.0/24\\n' > lone.conf && chmod 600 lone.conf && "
        f"pub=$({VENV}/bin/hpcfed vpn keygen --config lone.conf) && "
        'sed -i "s|^\\[Peer\\]|[Peer]\\nPublicKey = $pub|" lone.conf && '
        f"{VENV}/bin/hpcfed tunnel up --config lone.conf --handshake-timeout 2",
        timeout=60,
    )
    assert proc.returncode == 9, proc
    assert proc.stderr.startswith("hpcfed: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
