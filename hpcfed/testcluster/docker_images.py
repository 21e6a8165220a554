"""Build the Docker test cluster's images locally (no registry), each cached by a content hash.

Three layers per Debian suite, each tagged with a hash of its recipe, so a second `up` (or a
second machine with the same recipe) reuses what exists and rebuilds only what changed:

1. `hpcfed-tc-base:<suite>-<hash>`: `debootstrap --variant=minbase` imported with `docker import`;
2. `hpcfed-tc-system:<suite>-<hash>`: Slurm, munge, MariaDB, sshd, cron, iptables, nftables, WireGuard and
   Apptainer (Dockerfile.system);
3. `hpcfed-tc:<suite>-<hash>`: hpcfed from a wheel of the installed package (Dockerfile.hpcfed),
   which `make install` built from the source tree; its hash is the installed files' RECORD, so a
   code change rebuilds only this thin layer.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import jinja2

from hpcfed.errors import EnvironmentProblem
from hpcfed.testcluster.docker_spec import LABEL, SLURM_ETC, DockerClusterSpec

Progress = Callable[[str], None]
RECIPES = Path(__file__).resolve().parent / "docker"
# Packages debootstrap adds to minbase: enough for apt over the mirror inside `docker build`.
BASE_INCLUDE = ("ca-certificates",)
APPTAINER_PREFIX = os.environ.get("APPTAINER_PREFIX", "/opt/hpcfed/apptainer")
PYTHON_OF_SUITE = {"bookworm": "3.11", "trixie": "3.13"}


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _render(name: str, **ctx) -> str:
    text = (RECIPES / name).read_text()
    return jinja2.Template(
        text, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    ).render(**ctx)


def image_exists(tag: str) -> bool:
    proc = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True)
    return proc.returncode == 0


def debian_mirror() -> str:
    """The machine's own Debian mirror (as 30-apptainer.sh finds it), never a name of ours."""
    uris: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in Path(path).read_text().splitlines():
            if line.startswith("URIs:"):
                uris += line.split()[1:]
    if os.path.exists("/etc/apt/sources.list"):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            if line.startswith("deb "):
                uris += [w for w in line.split()[1:] if "://" in w][:1]
    for uri in uris:
        if "security" not in uri and "debian" in uri:
            return uri
    raise EnvironmentProblem(
        "no Debian mirror found in /etc/apt/sources.list*: debootstrap needs one"
    )


class ImageBuilder:
    def __init__(self, spec: DockerClusterSpec, progress: Progress):
        self.spec = spec
        self.progress = progress
        self.timings: dict[str, float] = {}

    # ---- tags (pure: computing them builds nothing)
    def base_tag(self) -> str:
        recipe = _digest("base-v1", self.spec.suite, "minbase", *BASE_INCLUDE)
        return f"hpcfed-tc-base:{self.spec.suite}-{recipe}"

    def system_dockerfile(self) -> str:
        return _render(
            "Dockerfile.system", base=self.base_tag(), user=self.spec.user, slurm_etc=SLURM_ETC
        )

    def system_tag(self) -> str:
        recipe = _digest(self.system_dockerfile(), _apptainer_version())
        return f"hpcfed-tc-system:{self.spec.suite}-{recipe}"

    def hpcfed_dockerfile(self) -> str:
        return _render("Dockerfile.hpcfed", system=self.system_tag(), source_hash=source_hash())

    def tag(self) -> str:
        return f"hpcfed-tc:{self.spec.suite}-{_digest(self.hpcfed_dockerfile())}"

    # ---- building
    def ensure(self) -> str:
        """The final image's tag, building whatever layer is missing."""
        t0 = time.monotonic()
        base, system, final = self.base_tag(), self.system_tag(), self.tag()
        if image_exists(final):
            self.progress(f"image {final} exists: reused")
            return final
        if not image_exists(base):
            self._timed("base", lambda: self._build_base(base))
        if not image_exists(system):
            self._timed("system", lambda: self._build_system(system))
        self._timed("hpcfed", lambda: self._build_hpcfed(final))
        self.progress(f"image {final} built in {time.monotonic() - t0:.0f} s")
        return final

    def _timed(self, what: str, build: Callable[[], None]) -> None:
        t0 = time.monotonic()
        build()
        self.timings[what] = round(time.monotonic() - t0, 1)
        self.progress(f"{what} image built in {self.timings[what]:.0f} s")

    def _build_base(self, tag: str) -> None:
        if shutil.which("debootstrap") is None:
            raise EnvironmentProblem(
                "debootstrap is missing: it builds the test cluster's base image "
                "(apt-get install debootstrap, or run scripts/bootstrap)"
            )
        suite = self.spec.suite
        with tempfile.TemporaryDirectory(prefix=f"hpcfed-rootfs-{suite}-") as root:
            self.progress(f"debootstrap {suite} minbase (about a minute)")
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_INCLUDE)}",
                    suite,
                    root,
                    debian_mirror(),
                ],
                f"debootstrap {suite}",
            )
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in glob.glob(os.path.join(root, junk, "*")):
                    if os.path.isfile(f):
                        os.unlink(f)
            self.progress(f"docker import {tag}")
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            imp = subprocess.run(
                ["docker", "import", "-c", f"LABEL {LABEL}=base", "-", tag],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
            )
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
            if imp.returncode != 0 or tar.returncode != 0:
                raise EnvironmentProblem(f"docker import {tag} failed: {imp.stderr.strip()}")

    def _build_system(self, tag: str) -> None:
        if not os.path.isfile(os.path.join(APPTAINER_PREFIX, "bin", "apptainer")):
            raise EnvironmentProblem(
                f"no Apptainer in {APPTAINER_PREFIX}: the compute image copies it "
                "(run scripts/bootstrap.d/30-apptainer.sh)"
            )
        with tempfile.TemporaryDirectory(prefix="hpcfed-ctx-") as ctx:
            Path(ctx, "Dockerfile").write_text(self.system_dockerfile())
            shutil.copytree(APPTAINER_PREFIX, os.path.join(ctx, "apptainer"), symlinks=True)
            self._docker_build(ctx, tag)

    def _build_hpcfed(self, tag: str) -> None:
        with tempfile.TemporaryDirectory(prefix="hpcfed-ctx-") as ctx:
            wheels = os.path.join(ctx, "wheels")
            os.makedirs(wheels)
            wheel = build_wheel(wheels, self.progress)
            self.progress(f"downloading hpcfed's dependencies for Python {self._python}")
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--only-binary=:all:",
                    "--platform=manylinux2014_x86_64",
                    "--platform=manylinux_2_28_x86_64",
                    "--platform=linux_x86_64",  # the hpcfed wheel itself (built here)
                    f"--python-version={self._python}",
                    "-d",
                    wheels,
                    wheel,
                ],
                "pip download (hpcfed's dependencies)",
            )
            Path(ctx, "Dockerfile").write_text(self.hpcfed_dockerfile())
            self._docker_build(ctx, tag)

    @property
    def _python(self) -> str:
        return PYTHON_OF_SUITE[self.spec.suite]

    def _docker_build(self, ctx: str, tag: str) -> None:
        self.progress(f"docker build {tag}")
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        proc = subprocess.Popen(
            # --label, not a LABEL step: one layer commit less (slow on fuse-overlayfs).
            ["docker", "build", "--rm", "--force-rm", "--label", f"{LABEL}=image", "-t", tag, ctx],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-15:]
            if line.startswith("Step "):
                self.progress(f"  {line[:110]}")
        if proc.wait() != 0:
            raise EnvironmentProblem(f"docker build {tag} failed:\n" + "\n".join(tail))


def _installed() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("hpcfed")
    except importlib.metadata.PackageNotFoundError as e:
        raise EnvironmentProblem("hpcfed is not installed as a package (pip install .)") from e


def _wheel_files(dist: importlib.metadata.Distribution) -> list:
    """The installed package's own files (not the console script, not install bookkeeping)."""
    skip = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}
    return [
        f
        for f in dist.files or []
        if not str(f).startswith("..")
        and "__pycache__" not in f.parts
        and not (f.parts[0].endswith(".dist-info") and f.name in skip)
    ]


def source_hash() -> str:
    """A hash of the installed hpcfed (its RECORD lists every file's sha256): a reinstall from a
    changed tree (`make install`) means a new hpcfed layer, an unchanged one reuses it."""
    dist = _installed()
    record = dist.read_text("RECORD") or ""
    lines = sorted(
        x for x in record.splitlines() if not x.startswith("..") and "dist-info" not in x
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def build_wheel(out_dir: str, progress: Progress) -> str:
    """Repack the installed hpcfed (the one under test, Rust module included) into a wheel.

    The installed package was itself built from the source tree by `make install`; repacking it
    avoids a second Rust build (and waiting on a shared cargo lock) for every image.
    """
    dist = _installed()
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = [x.split(":", 1)[1].strip() for x in wheel_meta.splitlines() if x.startswith("Tag:")]
    if not tags:
        raise EnvironmentProblem("the installed hpcfed has no wheel tag (WHEEL file): reinstall it")
    files = _wheel_files(dist)
    if not any(f.name.startswith("_tunnel") for f in files):
        raise EnvironmentProblem("the installed hpcfed lacks its Rust module _tunnel: reinstall it")
    version = dist.version
    info_dir = f"hpcfed-{version}.dist-info"
    path = os.path.join(out_dir, f"hpcfed-{version}-{tags[0]}.whl")
    progress(f"packing the installed hpcfed {version} into {os.path.basename(path)}")
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            data = Path(str(dist.locate_file(f))).read_bytes()
            zf.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{f},sha256={digest.decode()},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return path


def _apptainer_version() -> str:
    binary = os.path.join(APPTAINER_PREFIX, "bin", "apptainer")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "none"
    return out.stdout.strip()


def _run(argv: list, what: str, env: Optional[dict] = None, timeout: float = 1800) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise EnvironmentProblem(f"{what} failed: {' | '.join(lines[-3:]) or proc.returncode}")
