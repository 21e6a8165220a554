"""Render the Docker test cluster into a directory: docker-compose.yml and the files it mounts.

The directory is the artefact: a user can run it on a laptop with `docker compose up -d` (once the
images exist), and `hpcfed testcluster up --engine docker` runs exactly this file.
Pure rendering here; `write()` is the only function that touches the file system.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import jinja2
import yaml

from hpcfed.testcluster.docker_spec import LABEL, SLURM_ETC, DockerClusterSpec

RECIPES = Path(__file__).resolve().parent / "docker"
ENTRYPOINT = "/usr/local/sbin/hpcfed-node"
# Apptainer needs namespaces and FUSE; hpcfed-node.sh also unmasks /proc for its --containall.
APPTAINER_SECURITY = ("seccomp=unconfined", "apparmor=unconfined")
COMPUTE_CAPS = (
    "SYS_ADMIN",
    "NET_ADMIN",
    "MKNOD",
    "SYS_PTRACE",
    "SYS_CHROOT",
    "SETPCAP",
    "SETFCAP",
    "SYS_NICE",
    "IPC_LOCK",
    "DAC_READ_SEARCH",
)
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(RECIPES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
)


def nodelist(spec: DockerClusterSpec) -> str:
    return f"node[1-{spec.nodes}]" if spec.nodes > 1 else "node1"


def render_etc(spec: DockerClusterSpec, db_password: str) -> dict[str, str]:
    """etc/<name> -> content (slurm.conf, gres.conf, slurmdbd.conf)."""
    ctx = {"s": spec, "nodelist": nodelist(spec), "db_password": db_password}
    return {
        name: _env.get_template(f"{name}.j2").render(**ctx)
        for name in ("slurm.conf", "gres.conf", "slurmdbd.conf")
    }


def _environment(spec: DockerClusterSpec) -> dict[str, str]:
    return {
        "SLURM_CONF": f"{SLURM_ETC}/slurm.conf",
        "HPCFED_CLUSTER": spec.cluster_name,
        "HPCFED_ACCOUNT": spec.account,
        "HPCFED_USER": spec.user,
        "HPCFED_GPUS": str(spec.gpus_per_node),
        "HPCFED_CTLD_IP": spec.cluster_ip("slurmctld"),
        "HPCFED_SLURMCTLD_PORT": str(spec.slurmctld_port),
        "HPCFED_SLURMD_PORT": str(spec.slurmd_port),
        "HPCFED_CLUSTER_SUBNET": spec.cluster_subnet,
        "HPCFED_HUB_IP": spec.hub_ip,
        "HPCFED_WG_PORT": str(spec.wireguard_port),
    }


def _mounts(*names: str) -> list[str]:
    return [f"./etc/{n}:{SLURM_ETC}/{n}:ro" for n in names]


def compose_document(spec: DockerClusterSpec, image: str) -> dict:
    labels = {LABEL: spec.project}

    def service(host: str, role: str, networks: dict, volumes: list, **extra) -> dict:
        return {
            "container_name": spec.container(host),
            "hostname": host,
            "image": image,
            "command": [ENTRYPOINT, role],
            "init": True,  # docker-init reaps the daemons' children and forwards SIGTERM
            **extra,
            "networks": networks,
            "volumes": ["./hpcfed-node.sh:" + ENTRYPOINT + ":ro", *volumes],
            "environment": _environment(spec),
            "labels": dict(labels),
            "stop_grace_period": "20s",
        }

    def on(host: str, *nets: str) -> dict:
        addr = {"cluster": spec.cluster_ip, "internet": spec.internet_ip}
        return {net: {"ipv4_address": addr[net](host)} for net in nets}

    services = {
        "slurmctld": service(
            "slurmctld",
            "controller",
            on("slurmctld", "cluster"),
            ["munge:/etc/munge", *_mounts("slurm.conf", "gres.conf", "slurmdbd.conf")],
        )
    }
    for node in spec.node_names:
        # Not `privileged`: that asks for every capability, and hosts that are themselves
        # containers lack some (CAP_SYS_RESOURCE here) and refuse to start it. These are what
        # slurmd, mknod of the fake GPUs, iptables and Apptainer (FUSE, namespaces) need.
        services[node] = service(
            node,
            "compute",
            on(node, "cluster", "internet"),
            ["munge:/etc/munge", "home:/home", *_mounts("slurm.conf", "gres.conf")],
            cap_add=list(COMPUTE_CAPS),
            security_opt=list(APPTAINER_SECURITY),
            devices=["/dev/fuse:/dev/fuse"],
            device_cgroup_rules=["c 195:* rmw"],  # the fake GPUs, /dev/nvidiaN
        )
    for login in spec.login_names:
        # Apptainer works on the login nodes too (FUSE, namespaces), as on most sites: the
        # federation's admin console runs in the framework's image there.
        services[login] = service(
            login,
            "login",
            on(login, "cluster", "internet"),
            ["munge:/etc/munge", "home:/home", *_mounts("slurm.conf", "gres.conf")],
            cap_add=list(COMPUTE_CAPS),
            security_opt=list(APPTAINER_SECURITY),
            devices=["/dev/fuse:/dev/fuse"],
        )
    services["hub"] = service(
        "hub",
        "hub",
        on("hub", "internet"),
        [],
        # NET_ADMIN + the TUN device for wireguard-go; SYS_ADMIN to make /proc/sys writable
        # (`hpcfed hub up` turns on ip_forward itself).
        cap_add=["NET_ADMIN", "SYS_ADMIN"],
        security_opt=["apparmor=unconfined"],
        devices=["/dev/net/tun:/dev/net/tun"],
    )

    def network(subnet: str) -> dict:
        # internal: no route off the machine; only these containers talk to each other.
        return {"internal": True, "labels": labels, "ipam": {"config": [{"subnet": subnet}]}}

    return {
        "version": "2.4",
        "services": services,
        "networks": {
            "cluster": network(spec.cluster_subnet),
            "internet": network(spec.internet_subnet),
        },
        "volumes": {"munge": {"labels": labels}, "home": {"labels": labels}},
    }


HEADER = """\
# hpcfed Docker test cluster: Slurm {slurm} (Debian {suite}), written by
# `hpcfed testcluster compose`. Hosts: slurmctld (slurmctld, slurmdbd, MariaDB), node1-{n}
# (slurmd, 4 fake {gpu} GPUs each, Apptainer), login1-{logins} (one shared /home), and the hub
# (wireguard-go) on the separate "internet" network. Compute nodes reach nothing there but UDP
# {wg} on the hub (a firewall inside each node: see hpcfed-node.sh).
#
# Images are built locally (no registry): `hpcfed testcluster up --engine docker --slurm {slurm}`
# builds {image} once (or reuses it), then runs this file. By hand:
#   docker-compose -p {project} up -d        # or: docker compose -p {project} up -d
#   docker exec -it {project}-login1 runuser -u {user} -- sinfo
#   docker-compose -p {project} down -v
"""


class _NoAliases(yaml.SafeDumper):
    """Spell every service out in full (no &id001 anchors): the file is meant to be read."""

    def ignore_aliases(self, data):
        return True


def render(spec: DockerClusterSpec, image: str) -> str:
    head = HEADER.format(
        slurm=spec.slurm,
        suite=spec.suite,
        n=spec.nodes,
        logins=spec.logins,
        gpu=spec.gpu_type,
        wg=spec.wireguard_port,
        image=image,
        project=spec.project,
        user=spec.user,
    )
    body = yaml.dump(
        compose_document(spec, image),
        Dumper=_NoAliases,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    return head + "\n" + body


def write(spec: DockerClusterSpec, image: str, out: str) -> list[str]:
    """Write the recipe into `out`; keeps an existing database password. Returns files written."""
    etc = os.path.join(out, "etc")
    os.makedirs(etc, exist_ok=True)
    dbd = os.path.join(etc, "slurmdbd.conf")
    files = render_etc(spec, _existing_password(dbd) or secrets.token_hex(16))
    written = []
    for name, text in files.items():
        _write(os.path.join(etc, name), text, 0o600 if name == "slurmdbd.conf" else 0o644)
        written.append(f"etc/{name}")
    shutil.copy(RECIPES / "hpcfed-node.sh", os.path.join(out, "hpcfed-node.sh"))
    os.chmod(os.path.join(out, "hpcfed-node.sh"), 0o755)
    _write(os.path.join(out, "docker-compose.yml"), render(spec, image), 0o644)
    return ["docker-compose.yml", "hpcfed-node.sh", *written]


def _write(path: str, text: str, mode: int) -> None:
    # A random temp name created exclusively, then renamed: never a moment with wider modes.
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _existing_password(path: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("StoragePass="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None
