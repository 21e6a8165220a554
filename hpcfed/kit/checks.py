"""Whether a startup kit may be trusted, and what it says (role, name, server address, GPUs).

`verify_kit` reads only the files of the kit and returns a report; it never raises for a bad
kit, so `hpcfed kit verify` can list every problem at once. `require_ok` turns a failed report
into a KitError for the commands that must stop.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from hpcfed.errors import KitError

# cryptography is imported by the functions that check certificates and signatures: `hpcfed
# submit` reads only the kit's server address and GPU capacity (JSON), and cryptography's
# import costs it ~50 ms of CPU.
if TYPE_CHECKING:
    from cryptography import x509

EXPIRY_WARNING = dt.timedelta(days=30)
SIGNATURE_FILE = "signature.json"  # NVFlare <= 2.7 signs every kit file with the root-CA key
METADATA = "hpcfed-kit.json"  # what hpcfed adds to an installed kit (never signed by NVFlare)

# role -> (config file in startup/, certificate, key)
ROLE_FILES = {
    "server": ("fed_server.json", "server.crt", "server.key"),
    "client": ("fed_client.json", "client.crt", "client.key"),
    "admin": ("fed_admin.json", "client.crt", "client.key"),
}


@dataclass(frozen=True)
class KitFacts:
    """What a kit says about itself (read from its files, trusted only after the checks)."""

    role: str
    name: str  # the leaf certificate's CN: site name, server name or admin e-mail
    organization: Optional[str]
    federation: str  # the root CA's CN: the project's short name
    server_host: Optional[str]  # the address the kit dials (client/admin) or listens on (server)
    server_port: Optional[int]
    gpu_capacity: Optional[int]  # num_of_gpus the dashboard baked into local/resources.json.default
    root_fingerprint: str  # "sha256:<hex>" of the root CA certificate (DER)
    not_after: str  # ISO-8601 UTC expiry of the leaf certificate
    signed: bool  # carries signature.json (NVFlare <= 2.7)
    # folders (relative, e.g. "startup") holding signature.json: recorded at install, so a
    # signature.json deleted later cannot turn a signed folder into an unchecked one
    signed_folders: Tuple[str, ...] = ()


@dataclass
class KitReport:
    path: str
    facts: Optional[KitFacts] = None
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    checks: Dict[str, bool] = field(default_factory=dict)  # check name -> passed

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "facts": asdict(self.facts) if self.facts else None,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "checks": dict(self.checks),
        }


def fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes

    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _cn(name: x509.Name) -> Optional[str]:
    from cryptography.x509.oid import NameOID

    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _org(name: x509.Name) -> Optional[str]:
    from cryptography.x509.oid import NameOID

    attrs = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else None


def _not_after(cert: x509.Certificate) -> dt.datetime:
    value = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    return value if value is not None else cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def _not_before(cert: x509.Certificate) -> dt.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=dt.timezone.utc)


def detect_role(kit: Path) -> Optional[str]:
    for role, (config, _, _) in ROLE_FILES.items():
        if (kit / "startup" / config).is_file():
            return role
    return None


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None


def _split_host_port(target: str) -> Tuple[Optional[str], Optional[int]]:
    host, _, port = target.rpartition(":")
    if not host:
        return target or None, None
    try:
        return host, int(port)
    except ValueError:
        return host, None


def server_address(kit: Path, role: str) -> Tuple[Optional[str], Optional[int]]:
    """Host and port the kit dials (client, admin) or serves on (server)."""
    config = _load_json(kit / "startup" / ROLE_FILES[role][0])
    if role == "admin":
        admin = config.get("admin", {})
        port = admin.get("port")
        return admin.get("host"), int(port) if port else None
    servers = config.get("servers") or [{}]
    target = (servers[0].get("service") or {}).get("target")
    if target:  # NVFlare 2.8+ (and server kits of every version)
        return _split_host_port(target)
    # NVFlare <= 2.7 client kits: overseer_agent.args.sp_end_point = "host:fl_port:admin_port"
    end_point = ((config.get("overseer_agent") or {}).get("args") or {}).get("sp_end_point")
    if end_point:
        parts = end_point.split(":")
        return parts[0], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return None, None


def resources_file(kit: Path) -> Optional[Path]:
    for name in ("resources.json", "resources.json.default"):
        if (kit / "local" / name).is_file():
            return kit / "local" / name
    return None


def gpu_capacity(kit: Path) -> Optional[int]:
    """num_of_gpus the site registered with (GPUResourceManager args), None when not declared."""
    path = resources_file(kit)
    if path is None:
        return None
    for comp in _load_json(path).get("components", []):
        args = comp.get("args") or {}
        if comp.get("id") == "resource_manager" and "num_of_gpus" in args:
            return int(args["num_of_gpus"])
    return None


def recorded_signed_folders(kit: Path) -> List[str]:
    """The folders hpcfed found signed when it installed this kit (from its metadata file)."""
    try:
        facts = json.loads((kit / METADATA).read_text()).get("facts") or {}
    except (OSError, ValueError, AttributeError):
        return []
    folders = facts.get("signed_folders") or []
    return [f for f in folders if isinstance(f, str)]


def _check_signatures(kit: Path, root: x509.Certificate, report: KitReport) -> List[str]:
    """Every folder holding signature.json: each file in it is listed and verifies (RSA-PSS).

    Returns the folders that hold one."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    public_key = root.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        report.errors.append("the root CA's key is not RSA: NVFlare signs kits with RSA-PSS")
        return []
    found: List[str] = []
    for folder, _dirs, files in os.walk(kit):
        if SIGNATURE_FILE not in files:
            continue
        rel = os.path.relpath(folder, kit)
        found.append(rel)
        try:
            signatures = json.loads(Path(folder, SIGNATURE_FILE).read_text())
        except (OSError, ValueError):
            report.errors.append(f"{rel}/{SIGNATURE_FILE} is not readable JSON")
            continue
        for name in sorted(files):
            if name == SIGNATURE_FILE or (name == METADATA and rel == "."):
                continue
            where = os.path.normpath(os.path.join(rel, name))
            sig = signatures.get(name)
            if not sig:
                report.errors.append(f"{where} is not signed (added after the kit was made?)")
                continue
            try:
                public_key.verify(
                    base64.b64decode(sig),
                    Path(folder, name).read_bytes(),
                    padding.PSS(
                        mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH
                    ),
                    hashes.SHA256(),
                )
            except (InvalidSignature, ValueError):
                report.errors.append(f"{where} does not match its signature: the file was changed")
    return found


def _missing_signatures(signed: List[str], required: Sequence[str]) -> List[str]:
    """Folders that must hold signature.json and do not.

    NVFlare <= 2.7 always signs startup/, so a kit signed anywhere must be signed there; and a
    folder signed when the kit was installed (or when its federation was pinned) stays signed.
    """
    must = set(required) | ({"startup"} if signed else set())
    return sorted(must - set(signed))


def verify_kit(
    path,
    expected_name: Optional[str] = None,
    pinned_fingerprint: Optional[str] = None,
    now: Optional[dt.datetime] = None,
    signed_folders: Sequence[str] = (),
) -> KitReport:
    """Run every check on the kit unpacked at `path`; see the module docstring.

    signed_folders: folders that must carry signature.json (besides those the kit's own
    metadata recorded at install)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    kit = Path(path)
    report = KitReport(path=str(kit))
    now = now or dt.datetime.now(dt.timezone.utc)
    if not (kit / "startup").is_dir():
        report.errors.append(f"{kit}: no startup/ folder - not an NVFlare startup kit")
        return report
    for folder, dirs, files in os.walk(kit):
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                rel = os.path.relpath(os.path.join(folder, name), kit)
                report.errors.append(f"{rel} is a symbolic link; a kit holds only plain files")
    role = detect_role(kit)
    if role is None:
        report.errors.append(
            f"{kit}/startup holds none of fed_client.json, fed_server.json, fed_admin.json"
        )
        return report
    config, cert_name, key_name = ROLE_FILES[role]
    startup = kit / "startup"
    try:
        root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
        leaf = x509.load_pem_x509_certificate((startup / cert_name).read_bytes())
    except (OSError, ValueError) as exc:
        report.errors.append(f"cannot read the kit's certificates: {exc}")
        return report

    # 1. the leaf is issued by the kit's root CA, and the root signs itself
    try:
        root.verify_directly_issued_by(root)
        leaf.verify_directly_issued_by(root)
        report.checks["chain"] = True
    except (InvalidSignature, ValueError, TypeError):
        report.checks["chain"] = False
        report.errors.append(
            f"startup/{cert_name} ({_cn(leaf.subject)}) is not signed by the kit's root CA "
            f"({_cn(root.subject)}): the kit mixes files from different federations"
        )

    # 2. the private key belongs to the certificate
    try:
        key = serialization.load_pem_private_key((startup / key_name).read_bytes(), password=None)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        matches = key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
        report.checks["key_matches"] = matches
        if not matches:
            report.errors.append(
                f"startup/{key_name} is not the private key of startup/{cert_name}"
            )
        mode = os.stat(startup / key_name).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            report.warnings.append(
                f"startup/{key_name} is readable by others (mode {oct(mode & 0o777)}): chmod 600 it"
            )
    except (OSError, ValueError, TypeError) as exc:
        report.checks["key_matches"] = False
        report.errors.append(
            f"startup/{key_name} is not a readable unencrypted private key ({exc})"
        )

    # 3. the certificate names the expected site / server / user
    name = _cn(leaf.subject) or ""
    if expected_name is not None:
        report.checks["name"] = name == expected_name
        if name != expected_name:
            report.errors.append(f"the kit's certificate is for {name!r}, not {expected_name!r}")

    # 4. validity period
    not_after = _not_after(leaf)
    expiries = [(f"startup/{cert_name}", leaf), ("startup/rootCA.pem", root)]
    report.checks["valid_now"] = True
    for label, cert in expiries:
        if _not_after(cert) <= now:
            report.checks["valid_now"] = False
            report.errors.append(f"{label} expired on {_not_after(cert):%Y-%m-%d}: pull a new kit")
        elif _not_before(cert) > now:
            report.checks["valid_now"] = False
            report.errors.append(
                f"{label} is not valid before {_not_before(cert):%Y-%m-%d %H:%M} UTC (clock skew?)"
            )
        elif _not_after(cert) - now < EXPIRY_WARNING:
            report.warnings.append(
                f"{label} expires on {_not_after(cert):%Y-%m-%d}: pull a new kit soon"
            )

    # 5. trust on first use: the root is the one pinned for this federation
    root_fp = fingerprint(root)
    if pinned_fingerprint is not None:
        report.checks["pinned_root"] = root_fp == pinned_fingerprint
        if root_fp != pinned_fingerprint:
            report.errors.append(
                f"the kit's root CA {root_fp} is not the one pinned for federation {_cn(root.subject)!r} "
                f"({pinned_fingerprint}); if the federation really re-created its CA, pull again with --repin"
            )

    # 6. legacy kits (NVFlare <= 2.7): every signed file verifies against the root CA
    errors_before = len(report.errors)
    signed = _check_signatures(kit, root, report)
    for folder in _missing_signatures(signed, list(signed_folders) + recorded_signed_folders(kit)):
        report.errors.append(
            f"{folder}/{SIGNATURE_FILE} is missing, but the kit was signed (NVFlare <= 2.7): "
            "its files can no longer be checked; pull the kit again"
        )
    if signed or len(report.errors) > errors_before:
        report.checks["signatures"] = len(report.errors) == errors_before

    try:
        host, port = server_address(kit, role)
        gpus = gpu_capacity(kit)
    except (ValueError, TypeError, AttributeError) as exc:
        report.errors.append(str(exc))
        host, port, gpus = None, None, None
    report.facts = KitFacts(
        role=role,
        name=name,
        organization=_org(leaf.subject),
        federation=_cn(root.subject) or "",
        server_host=host,
        server_port=port,
        gpu_capacity=gpus,
        root_fingerprint=root_fp,
        not_after=not_after.isoformat(),
        signed=bool(signed),
        signed_folders=tuple(sorted(signed)),
    )
    return report


def require_ok(report: KitReport, what: str = "the kit") -> KitFacts:
    """The kit's facts; KitError naming the first problem (and how many more) when it failed."""
    if report.ok and report.facts is not None:
        return report.facts
    if not report.errors:
        raise KitError(f"{what} failed its checks: no facts could be read from it")
    more = f" (and {len(report.errors) - 1} more problem(s))" if len(report.errors) > 1 else ""
    raise KitError(f"{what} failed its checks: {report.errors[0]}{more}")
