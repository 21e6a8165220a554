"""Role images: plan a build (pure), run it with apptainer, list what an image directory holds.

A plan names the definition file (bundled in hpcfed/apptainer), the base image, the build
arguments and where the SIF lands; `build_image` runs `apptainer build` (with `--fakeroot` for a
normal user) into a temporary file and renames it into place, so a failed build never leaves a
half-written image where a job would pick it up.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

from hpcfed import frameworks
from hpcfed.errors import ConfigError, EnvironmentProblem, HpcfedError, NotFound
from hpcfed.paths import apptainer_defs_dir, data_dir

DEFAULT_BASE = "docker://python:3.11-slim"
COMPRESSIONS = {
    "gzip": "-comp gzip",
    "zstd": "-comp zstd -Xcompression-level 3",
    "lz4": "-comp lz4",
}
LABEL_PREFIX = "org.hpcfed."

# Linux capability numbers (include/uapi/linux/capability.h), to name the ones root lacks.
_CAPS = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
    "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
    "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
    "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()


@dataclass(frozen=True)
class BuildPlan:
    role: str
    framework: Optional[str]
    version: Optional[str]
    definition: str  # path of the .def file
    bootstrap: str  # docker | localimage | oras | library
    base_from: str  # the image reference or local path after the bootstrap agent
    output: str  # final SIF path
    fakeroot: bool
    compression: str
    build_args: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "framework": self.framework,
            "version": self.version,
            "definition": self.definition,
            "base": base_reference(self.bootstrap, self.base_from),
            "output": self.output,
            "fakeroot": self.fakeroot,
            "compression": self.compression,
            "build_args": dict(self.build_args),
        }


def parse_base(base: str) -> tuple[str, str]:
    """`docker://img`, `oras://ref`, `library://ref`, `localimage:/path` or a local path → (agent, from)."""
    for scheme in ("docker", "oras", "library"):
        if base.startswith(f"{scheme}://"):
            ref = base[len(scheme) + 3 :]
            if not ref:
                raise ConfigError(f"--base {base!r}: no image after {scheme}://")
            return scheme, ref
    path = base[len("localimage:") :] if base.startswith("localimage:") else base
    if not path or "://" in path:
        raise ConfigError(
            f"--base {base!r}: expected docker://IMAGE, localimage:/path/to/base.sif or a local SIF/sandbox path"
        )
    return "localimage", os.path.abspath(os.path.expanduser(path))


def base_reference(bootstrap: str, base_from: str) -> str:
    """The base as a user writes it (and as the image's label records it)."""
    return f"localimage:{base_from}" if bootstrap == "localimage" else f"{bootstrap}://{base_from}"


def image_roles(framework: str) -> tuple[str, ...]:
    """The roles of `framework` that run as jobs, each in an image of its own."""
    return tuple(n for n, r in frameworks.table().get(framework, {}).items() if r.is_job)


def check_image_role(framework: Optional[str], role: str) -> None:
    if framework not in frameworks.table():
        raise ConfigError(
            f"--framework {framework!r}: expected one of {', '.join(frameworks.frameworks())}"
        )
    roles = image_roles(framework)
    if role not in roles:
        raise ConfigError(
            f"role {role!r}: expected base or a {framework} role ({', '.join(roles)})"
        )


def image_name(role: str, framework: Optional[str], version: Optional[str]) -> str:
    if role == "base":
        return "hpcfed-base.sif"
    if framework and frameworks.one_image(framework):
        return f"{framework}-{version}.sif"
    return f"{framework}-{role}-{version}.sif"


def definition_path(role: str, framework: Optional[str]) -> Path:
    if role == "base":
        name = "base.def"
    elif framework and frameworks.one_image(framework):
        name = f"{framework}.def"
    else:
        name = f"{framework}-{role}.def"
    return apptainer_defs_dir() / name


def host_ca_bundle(environ) -> Optional[str]:
    """The CA bundle this host trusts, so pip in %post trusts the same (site TLS proxies)."""
    for candidate in (
        environ.get("PIP_CERT"),
        environ.get("SSL_CERT_FILE"),
        environ.get("REQUESTS_CA_BUNDLE"),
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def plan_build(
    role: str,
    *,
    framework: Optional[str],
    version: Optional[str],
    base: Optional[str],
    image_dir: str,
    as_root: bool,
    compression: str = "gzip",
    ca_bundle: Optional[str] = None,
    hpcfed_version: str = "unknown",
) -> BuildPlan:
    """Validate the request and decide everything the build does (pure)."""
    if role != "base":
        check_image_role(framework, role)
        if not version or not all(c.isalnum() or c in ".-+" for c in version):
            raise ConfigError(
                f"--version {version!r}: give the framework's exact version, e.g. 2.9.0"
            )
    else:
        framework = version = None
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"--compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}"
        )
    bootstrap, base_from = parse_base(base or DEFAULT_BASE)
    args: Dict[str, Optional[str]] = {
        "BOOTSTRAP": bootstrap,
        "FROM": base_from,
        "BASE": base_reference(bootstrap, base_from),
        "HPCFED_VERSION": hpcfed_version,
    }
    if role != "base":
        args["FRAMEWORK_VERSION"] = version
        if ca_bundle:
            args["CA_BUNDLE"] = ca_bundle
    return BuildPlan(
        role=role,
        framework=framework,
        version=version,
        definition=str(definition_path(role, framework)),
        bootstrap=bootstrap,
        base_from=base_from,
        output=str(Path(image_dir) / image_name(role, framework, version)),
        fakeroot=not as_root,
        compression=compression,
        build_args=args,
    )


def build_argv(plan: BuildPlan, apptainer: str, tmp_output: str) -> list[str]:
    argv = [apptainer, "build", "--force"]
    if plan.fakeroot:
        argv.append("--fakeroot")
    for key, value in sorted(plan.build_args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    argv += ["--mksquashfs-args", COMPRESSIONS[plan.compression], tmp_output, plan.definition]
    return argv


def missing_root_caps(status_text: str) -> list[str]:
    """Capabilities absent from this process's bounding set (parsed from /proc/self/status).

    Apptainer asks for every capability for root's %post and fails on hosts whose root lacks some
    (`Requesting capability set ... while permitted capability set is ...`); it drops the ones
    named in APPTAINER_DROP_CAPS, which it reads from the environment only.
    """
    for line in status_text.splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
            return [f"CAP_{name}" for bit, name in enumerate(_CAPS) if not bounding >> bit & 1]
    return []


def check_build(plan: BuildPlan) -> None:
    """Fail early, before anything runs, when an input of the build is missing."""
    if not os.path.isfile(plan.definition):
        raise NotFound(f"definition file {plan.definition} is missing from the hpcfed installation")
    if plan.bootstrap == "localimage" and not os.path.exists(plan.base_from):
        raise NotFound(f"--base localimage:{plan.base_from}: no such image or sandbox")
    out_dir = Path(plan.output).parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"image directory {out_dir}: {exc.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise EnvironmentProblem(f"image directory {out_dir}: not writable by this user")


def build_image(
    plan: BuildPlan,
    apptainer: str,
    on_line: Callable[[str], None],
) -> dict:
    """Run the build, streaming apptainer's output lines to on_line; returns the image record."""
    check_build(plan)
    out_dir = Path(plan.output).parent
    tmp = str(out_dir / f".{Path(plan.output).name}.{os.getpid()}.tmp")
    env = dict(os.environ)
    if not plan.fakeroot:
        with open("/proc/self/status") as fh:
            missing = missing_root_caps(fh.read())
        if missing:
            env["APPTAINER_DROP_CAPS"] = ",".join(missing)
    argv = build_argv(plan, apptainer, tmp)
    tail: list[str] = []
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            on_line(line)
            tail = (tail + [line])[-20:]
        rc = proc.wait()
    except BaseException:  # interrupted: stop apptainer, leave no partial image
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        _remove(tmp)
        raise
    if rc != 0:
        _remove(tmp)
        if plan.version and any("No matching distribution found" in l for l in tail):
            raise ConfigError(
                f"--version {plan.version}: {plan.framework}=={plan.version} is not on the "
                "package index (pip: No matching distribution found)"
            )
        reason = next(
            (l for l in reversed(tail) if "FATAL" in l or "ERROR" in l), tail[-1] if tail else ""
        )
        raise HpcfedError(f"apptainer build of {plan.role} failed (exit {rc}): {reason.strip()}")
    os.replace(tmp, plan.output)
    return describe_image(plan.output, apptainer)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def image_labels(path: str, apptainer: str) -> dict:
    proc = subprocess.run(
        [apptainer, "inspect", "--labels", "--json", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return {}
    try:
        return json.loads(proc.stdout)["data"]["attributes"]["labels"] or {}
    except (ValueError, KeyError, TypeError):
        return {}


def describe_image(path: str, apptainer: Optional[str]) -> dict:
    """What `image list` shows for one SIF: role, framework and version from its labels."""
    st = os.stat(path)
    labels = image_labels(path, apptainer) if apptainer else {}
    return {
        "path": path,
        "name": os.path.basename(path),
        "size_mb": round(st.st_size / 1e6, 1),
        "role": labels.get(LABEL_PREFIX + "role"),
        "framework": labels.get(LABEL_PREFIX + "framework"),
        "framework_version": labels.get(LABEL_PREFIX + "framework-version"),
        "base": labels.get(LABEL_PREFIX + "base"),
        "built": labels.get("org.label-schema.build-date"),
        "labels": labels,
    }


def list_images(image_dir: str, apptainer: Optional[str]) -> list[dict]:
    directory = Path(image_dir)
    if not directory.is_dir():
        return []
    return [describe_image(str(p), apptainer) for p in sorted(directory.glob("*.sif"))]


def default_image_dir() -> str:
    return str(data_dir() / "images")


def resolve_image_dir(explicit: Optional[str], site_name: Optional[str]) -> tuple[str, str]:
    """(directory, where it came from): --image-dir, else the site's apptainer.image_dir, else data dir."""
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit)), "--image-dir"
    if site_name:
        from hpcfed.profiles import load_site

        site = load_site(site_name)
        configured = getattr(site.profile.apptainer, "image_dir", None)
        if configured:
            return os.path.abspath(
                os.path.expanduser(configured)
            ), f"site {site_name} (apptainer.image_dir)"
    return default_image_dir(), "default"
