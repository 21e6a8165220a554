"""Fed-BioMed components as hpcfed kits: created in the image, stored like NVFlare kits.

A Fed-BioMed 6 *component* (`fedbiomed component create -c NODE|RESEARCHER -p DIR`) is what a
startup kit is for NVFlare: the component's id, `etc/config.ini` (the researcher's address for a
node; the gRPC host and port for the researcher) and a self-signed certificate. The researcher's
certificate carries its host name as CN and no SAN, so nodes must dial exactly that name: the
federation's server name, which the tunnel's hosts mapping makes resolve in every job.

The component is created by the Fed-BioMed of the image the jobs run (so the versions match),
inside a private staging directory, then moved into the kit store (0700 directories, 0600 files)
with the same versions/current/previous layout as NVFlare kits. `hpcfed submit` finds it with
`find_kit(site, role)`. Paths inside a component are relative to its root, so the job may use a
copy of it anywhere (the kit is mounted read-only; the job copies it into its workspace).
"""

from __future__ import annotations

import configparser
import datetime as dt
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509

from hpcfed import names
from hpcfed.container.apptainer import WORKSPACE_MOUNT, bind_path, exec_argv
from hpcfed.errors import ConfigError, HpcfedError, KitError, NotFound
from hpcfed.kit import store
from hpcfed.kit.checks import KitFacts, _cn, _not_after, fingerprint

ROLES = ("node", "researcher")
DEFAULT_PORT = 50051  # Fed-BioMed's gRPC port (researcher serves, nodes dial)
COMPONENT_TYPE = {"node": "NODE", "researcher": "RESEARCHER"}
# Where each component's certificate is named in its etc/config.ini ([certificate] public_key,
# relative to etc/).
CONFIG_FILE = "etc/config.ini"


@dataclass(frozen=True)
class ComponentPlan:
    """Everything `create_component` does, decided and checked up front (pure)."""

    role: str
    federation: str
    site: str
    server_host: str
    server_port: int
    image: str

    def environment(self) -> dict[str, str]:
        """Fed-BioMed reads the researcher's address from these at creation (not secrets)."""
        if self.role == "researcher":
            return {"FBM_SERVER_HOST": self.server_host, "FBM_SERVER_PORT": str(self.server_port)}
        return {"FBM_RESEARCHER_IP": self.server_host, "FBM_RESEARCHER_PORT": str(self.server_port)}

    def command(self, root: str) -> list[str]:
        return ["fedbiomed", "component", "create", "-c", COMPONENT_TYPE[self.role], "-p", root]


def parse_server(server: str) -> tuple[str, int]:
    """`HOST` or `HOST:PORT` → (host, port); the host must be a plain DNS name (the cert's CN)."""
    host, sep, port_text = server.rpartition(":")
    if not sep:
        host, port_text = server, str(DEFAULT_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--server {server!r}: the port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"--server {server!r}: port {port} is outside 1-65535")
    labels = host.split(".")
    if not host or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
        for label in labels
    ):
        raise ConfigError(
            f"--server {server!r}: {host!r} is not a host name (nodes dial exactly this name: "
            "the researcher's certificate carries it as its only name)"
        )
    return host, port


def plan_component(
    role: str, *, federation: str, site: str, server: str, image: str
) -> ComponentPlan:
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    store.check_name("federation", federation)
    names.check_name("site", site)
    host, port = parse_server(server)
    image = os.path.abspath(os.path.expanduser(image))
    if not os.path.isfile(image):
        raise NotFound(
            f"--image {image}: no such image (build it with "
            "`hpcfed image build node --framework fedbiomed --version 6.4.1`)"
        )
    bind_path(image, "--image")
    return ComponentPlan(role, federation, site, host, port, image)


def _config(root: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    if not cfg.read(root / CONFIG_FILE):
        raise KitError(f"{root}: no {CONFIG_FILE} (not a Fed-BioMed component)")
    return cfg


def component_address(root: Path, role: str) -> tuple[str, int]:
    """The server address a component records: the researcher's own host and port, or the
    researcher a node dials."""
    cfg = _config(root)
    section, key = ("server", "host") if role == "researcher" else ("researcher", "ip")
    try:
        return cfg.get(section, key), cfg.getint(section, "port")
    except (configparser.Error, ValueError) as exc:
        raise KitError(f"{root / CONFIG_FILE}: {exc}") from None


def read_facts(root: Path, plan: ComponentPlan) -> KitFacts:
    """What the created component says about itself, checked against what was asked."""
    host, port = component_address(root, plan.role)
    try:
        cert_rel = _config(root).get("certificate", "public_key")
    except configparser.Error as exc:
        raise KitError(f"{root / CONFIG_FILE}: {exc}") from None
    if (host, port) != (plan.server_host, plan.server_port):
        raise KitError(
            f"{root / CONFIG_FILE}: Fed-BioMed recorded {host}:{port}, not "
            f"{plan.server_host}:{plan.server_port} (does the image's Fed-BioMed read "
            "FBM_SERVER_HOST/FBM_RESEARCHER_IP?)"
        )
    cert = x509.load_pem_x509_certificate(((root / "etc") / cert_rel).read_bytes())
    return KitFacts(
        role=plan.role,
        name=_cn(cert.subject) or "",
        organization=None,
        federation=plan.federation,
        server_host=host,
        server_port=port,
        gpu_capacity=None,
        # No CA in Fed-BioMed: the component's own certificate identifies it.
        root_fingerprint=fingerprint(cert),
        not_after=_not_after(cert).astimezone(dt.timezone.utc).isoformat(timespec="seconds"),
        signed=False,
    )


def create_component(
    plan: ComponentPlan, apptainer: str, on_line: Callable[[str], None] = lambda line: None
) -> store.InstalledKit:
    """Create the component with the image's Fed-BioMed and install it as the site's kit."""
    staging = store.staging_dir()
    try:
        argv, env = exec_argv(
            apptainer=apptainer,
            image=plan.image,
            command=plan.command(f"{WORKSPACE_MOUNT}/component"),
            gpu_flag=None,
            binds=[],
            kit_dir=None,
            workspace=str(staging),
            env=plan.environment(),
            hosts_file=None,
            job_env={},
        )
        proc = subprocess.run(
            argv,
            env=dict(os.environ, **env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=600,
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            on_line(line)
        root = staging / "component"
        if proc.returncode != 0 or not root.is_dir():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise HpcfedError(
                f"fedbiomed component create -c {COMPONENT_TYPE[plan.role]} failed in "
                f"{plan.image} (exit {proc.returncode}): {last[0]}"
            )
        facts = read_facts(root, plan)
        return store.install_kit(root, facts, plan.site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_component(site: str, role: str) -> Optional[store.InstalledKit]:
    return store.find_kit(site, role)


def resolve_component(kit: Optional[str], site: str, role, local: bool = True) -> tuple:
    """(kit dir, (server name, port), None) for a Fed-BioMed role at submit: --kit, else the
    component installed for the site; its recorded server address is what the tunnel's forward
    and the container's /etc/hosts provide. A --kit on the cluster only is used as given."""
    if kit is not None:
        path = Path(os.path.expanduser(kit))
        if not local or not path.is_dir():
            return kit, None, None
        try:
            return kit, component_address(path, role.name), None
        except KitError as exc:
            raise KitError(f"--kit {kit}: {exc}") from None
    found = find_component(site, role.name)
    if found is None:
        raise NotFound(
            f"--kit: no Fed-BioMed {role.name} component for site {site}; make it with "
            f"`hpcfed kit fedbiomed create {role.name} --federation F --site {site} "
            "--server NAME --image SIF`"
        )
    return found.path, (found.server_host, found.server_port), None
