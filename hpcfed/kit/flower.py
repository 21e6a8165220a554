"""Flower credentials, without a dashboard: what a federation operator and each site need.

Flower's node authentication requires TLS, so a federation has
- a CA and a server certificate whose names are the federation's server name (what SuperNodes
  and the operator dial; the tunnel and the container's /etc/hosts make that name resolve), made
  by the operator (`hpcfed kit flower ca`);
- per site an ECDSA key in OpenSSH format, made where it is used (`hpcfed kit flower keygen`):
  the private key never leaves the site, the operator registers the public key with the
  SuperLink (`flwr supernode register`, through `hpcfed kit flower register`).

Layout under the data directory (directories 0700, private keys 0600 and created exclusively):

    flower/<federation>/operator/   ca.key ca.crt server.key server.pem federation.json
    flower/<federation>/superlink/  ca.crt server.pem server.key federation.json  (the SuperLink
                                    job's --kit: everything but the CA key)
    flower/<federation>/supernode/<site>/  ca.crt site.key site.pub federation.json  (a site's
                                    --kit for its SuperNode job)

federation.json names the federation, its server name and port: submit reads the address from it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from hpcfed import paths
from hpcfed.errors import ConfigError, KitError, NotFound

FEDERATION_FILE = "federation.json"
DEFAULT_PORT = 9093
CERT_DAYS = 825


@dataclass(frozen=True)
class Federation:
    name: str
    server_name: str
    port: int

    def to_json(self) -> str:
        return json.dumps(
            {"federation": self.name, "server_name": self.server_name, "port": self.port}, indent=1
        )

    @classmethod
    def read(cls, directory: Path) -> Federation:
        path = directory / FEDERATION_FILE
        try:
            data = json.loads(path.read_text())
            return cls(data["federation"], data["server_name"], int(data["port"]))
        except FileNotFoundError:
            raise NotFound(f"{path}: missing (not Flower credentials made by hpcfed)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KitError(f"{path}: unreadable ({exc})") from None


def root() -> Path:
    return paths.data_dir() / "flower"


def _name(kind: str, value: str) -> str:
    from hpcfed.names import check_name

    return check_name(kind, value)


def operator_dir(federation: str) -> Path:
    return root() / _name("--federation", federation) / "operator"


def superlink_dir(federation: str) -> Path:
    return root() / _name("--federation", federation) / "superlink"


def supernode_dir(federation: str, site: str) -> Path:
    return root() / _name("--federation", federation) / "supernode" / _name("--site", site)


# ---------------------------------------------------------------- files
def create_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a new file: a random temp name opened O_EXCL, fsynced, then linked to
    `path`, which must not exist (a key is never overwritten, a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(f"{path}: already exists; not overwritten") from None
    finally:
        tmp.unlink(missing_ok=True)


def _new_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path}: already exists; remove it to make new credentials")
    return paths.private_mkdir(path)


# ---------------------------------------------------------------- crypto (cryptography)
def _ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate(subject: str, public_key, issuer_key, issuer=None, *, ca: bool, sans=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        alt: List[x509.GeneralName] = []
        for san in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                alt.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA384())


def fingerprint(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":")


# ---------------------------------------------------------------- the operator
def make_ca(federation: str, server_name: str, port: int = DEFAULT_PORT) -> dict:
    """The federation's CA and server certificate (names = server_name); the SuperLink's kit."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a port (1-65535)")
    _name("--server-name", server_name)
    fed = Federation(federation, server_name, port)
    op, link = _new_dir(operator_dir(federation)), _new_dir(superlink_dir(federation))
    ca_key = _ec_key()
    ca_cert = _pem_cert(
        _certificate(f"{federation} Flower CA", ca_key.public_key(), ca_key, ca=True)
    )
    from cryptography import x509

    issuer = x509.load_pem_x509_certificate(ca_cert)
    server_key = _ec_key()
    server_cert = _pem_cert(
        _certificate(
            server_name,
            server_key.public_key(),
            ca_key,
            issuer,
            ca=False,
            # The SuperLink's own helpers (flower-superexec, flwr-serverapp) dial it on loopback.
            sans=(server_name, "localhost", "127.0.0.1"),
        )
    )
    create_private(op / "ca.key", _pem_key(ca_key))
    for d in (op, link):
        create_private(d / "ca.crt", ca_cert, 0o644)
        create_private(d / "server.key", _pem_key(server_key))
        create_private(d / "server.pem", server_cert, 0o644)
        create_private(d / FEDERATION_FILE, fed.to_json().encode(), 0o644)
    return {
        "federation": federation,
        "server_name": server_name,
        "port": port,
        "ca": str(op / "ca.crt"),
        "ca_fingerprint": fingerprint(ca_cert),
        "superlink_kit": str(link),
    }


# ---------------------------------------------------------------- a site
def keygen(federation: str, site: str, ca_file: str, server: str) -> dict:
    """A site's SuperNode key pair, made here (the private key never leaves this directory),
    with the federation's CA certificate and server address its SuperNode needs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    name, _, port = server.rpartition(":")
    if not name or not port.isdigit():
        raise ConfigError(f"--server {server!r}: expected NAME:PORT (the federation's server)")
    try:
        ca_pem = Path(ca_file).expanduser().read_bytes()
        x509.load_pem_x509_certificate(ca_pem)
    except OSError as exc:
        raise NotFound(f"--ca {ca_file}: {exc.strerror}") from None
    except ValueError:
        raise KitError(f"--ca {ca_file}: not a PEM certificate") from None
    d = _new_dir(supernode_dir(federation, site))
    key = _ec_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,  # what flower-supernode reads
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    create_private(d / "site.key", private)
    create_private(d / "site.pub", public + f" {site}\n".encode(), 0o644)
    create_private(d / "ca.crt", ca_pem, 0o644)
    create_private(
        d / FEDERATION_FILE, Federation(federation, name, int(port)).to_json().encode(), 0o644
    )
    return {
        "federation": federation,
        "site": site,
        "public_key": str(d / "site.pub"),
        "kit": str(d),
        "ca_fingerprint": fingerprint(ca_pem),
    }


# ---------------------------------------------------------------- submit
def _installed(role_credentials: str, site: str) -> List[Path]:
    base = root()
    if not base.is_dir():
        return []
    if role_credentials == "flower-superlink":
        return sorted(p for p in base.glob("*/superlink") if (p / FEDERATION_FILE).exists())
    return sorted(p for p in base.glob(f"*/supernode/{site}") if (p / FEDERATION_FILE).exists())


def resolve_credentials(kit: Optional[str], site: str, role, *, local: bool = True):
    """(kit dir, (server name, port), None) for a Flower role: --kit, else the one installed for
    the site. The server address in federation.json is what the command and tunnel use."""
    if kit is None:
        found = _installed(role.credentials, site)
        how = (
            "`hpcfed kit flower ca --federation F --server-name NAME`"
            if role.credentials == "flower-superlink"
            else f"`hpcfed kit flower keygen --federation F --site {site} --ca CA --server NAME:PORT`"
        )
        if not found:
            raise NotFound(
                f"--kit: no Flower {role.name} credentials for site {site}; make them with {how}"
            )
        if len(found) > 1:
            raise ConfigError(
                f"--kit: Flower {role.name} credentials of several federations "
                f"({', '.join(str(p) for p in found)}); give --kit DIR"
            )
        kit = str(found[0])
    if not local:
        return kit, None, None
    directory = Path(kit).expanduser()
    fed = Federation.read(directory)
    needed = (
        ("server.key", "server.pem", "ca.crt") if role.side == "server" else ("site.key", "ca.crt")
    )
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise KitError(f"--kit {kit}: no {', '.join(missing)} (Flower {role.name} credentials)")
    return kit, (fed.server_name, fed.port), None


def federation_of(federation: Optional[str]) -> Tuple[str, Federation]:
    """The operator's federation: named, or the only one there is."""
    if federation is None:
        made = sorted(p.parent.name for p in root().glob("*/operator")) if root().is_dir() else []
        if len(made) != 1:
            raise ConfigError(
                "--federation: name one of "
                + (", ".join(made) if made else "(none made yet: hpcfed kit flower ca)")
            )
        federation = made[0]
    return federation, Federation.read(operator_dir(federation))


# ---------------------------------------------------------------- the operator's console (flwr)
CONSOLE_HOME = "/fl/workspace"  # FLWR_HOME inside the image (exec_argv binds it there)
INPUT_DIR = f"{CONSOLE_HOME}/in"  # where run_flwr inputs appear in the image


@dataclass(frozen=True)
class Console:
    """How the operator's `flwr` reaches the SuperLink: in `image` (the name resolves through a
    generated /etc/hosts), through a tunnel peer of its own to the SuperLink's tunnel address."""

    federation: str
    image: Optional[str] = None
    tunnel_config: Optional[str] = None
    server_ip: Optional[str] = None
    apptainer: str = "apptainer"

    def check(self) -> None:
        if self.tunnel_config and not self.image:
            raise ConfigError(
                "--tunnel-config needs --image: the server name must resolve to the tunnel, "
                "which only the container's /etc/hosts can do"
            )
        if self.tunnel_config and not self.server_ip:
            raise ConfigError("--tunnel-config needs --server-ip (the SuperLink's tunnel address)")


def _config_toml(federation: str, address: str, ca: str) -> str:
    return (
        f'[superlink]\ndefault = "{federation}"\n\n'
        f'[superlink.{federation}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )


def run_flwr(
    console: Console,
    args: List[str],
    *,
    inputs: Tuple[Tuple[str, str], ...] = (),
    timeout: Optional[float] = None,
    stream=None,
):
    """Run `flwr ARGS` against the federation's SuperLink; (exit code, output).

    inputs: (host path, name) made readable as INPUT_DIR/NAME in the image (or used as given
    without one). stream: called with each output line as it comes.
    """
    import shutil
    import subprocess
    import tempfile

    from hpcfed import frameworks
    from hpcfed.container.apptainer import exec_argv

    console.check()
    fed = Federation.read(operator_dir(console.federation))
    home = Path(tempfile.mkdtemp(prefix="flwr-", dir=paths.private_mkdir(root() / ".console")))
    tunnel = None
    try:
        shutil.copy(operator_dir(console.federation) / "ca.crt", home / "ca.crt")
        port = fed.port
        if console.tunnel_config:
            tunnel, port = _console_tunnel(console, fed, home)
        inside = CONSOLE_HOME if console.image else str(home)
        (home / "config.toml").write_text(
            _config_toml(console.federation, f"{fed.server_name}:{port}", f"{inside}/ca.crt")
        )
        env = dict(frameworks.role("flower", "flwr").env, FLWR_HOME=inside)
        if console.image:
            indir = home / "in"
            indir.mkdir()
            for src, name in inputs:
                target = indir / name
                if Path(src).is_dir():
                    shutil.copytree(src, target)
                else:
                    shutil.copy(src, target)
            hosts = home / "hosts"
            hosts.write_text(f"127.0.0.1 localhost {fed.server_name}\n")
            argv, extra = exec_argv(
                apptainer=console.apptainer,
                image=console.image,
                command=["flwr", *args],
                gpu_flag=None,
                binds=[],
                kit_dir=None,
                workspace=str(home),
                env=env,
                hosts_file=str(hosts),
                job_env={},
            )
            full_env = dict(os.environ, **extra)
        else:
            argv = ["flwr", *args]
            full_env = dict(os.environ, **env)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=full_env,
            cwd=str(home),
        )
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream is not None:
                stream(line.rstrip("\n"))
        code = proc.wait(timeout=timeout)
        return code, "".join(lines)
    finally:
        if tunnel is not None and tunnel.poll() is None:
            tunnel.terminate()
            try:
                tunnel.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tunnel.kill()
        shutil.rmtree(home, ignore_errors=True)


def _console_tunnel(console: Console, fed: Federation, home: Path):
    """The console's own tunnel peer: -L to the SuperLink on a free local port (the node may
    run a SuperLink or SuperNode forwards on the federation's port itself)."""
    import subprocess

    from hpcfed.supervisor.role_process import free_port
    from hpcfed.tunnel.job import wait_ready

    role = frameworks_role("flwr")
    port = free_port()
    local, _ = role.forwards(str(console.server_ip), fed.port)
    spec = local[0].replace(f":{fed.port}=", f":{port}=", 1)
    ready = home / "tunnel.ready"
    argv = paths.hpcfed_command() + [
        "tunnel",
        "up",
        "--config",
        str(console.tunnel_config),
        "--ready-file",
        str(ready),
        "-L",
        spec,
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_ready(proc, str(ready), timeout=60)
    except BaseException:  # never leave the tunnel behind (it runs in its own session)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return proc, port


def frameworks_role(name: str):
    from hpcfed import frameworks

    return frameworks.role("flower", name)
