"""Installed kits and trust-on-first-use pins under the user's data directory.

Layout (all directories 0700, private files 0600):

    kits/<federation>/<role>/<site>/versions/<id>/   one unpacked kit + hpcfed-kit.json
    kits/<federation>/<role>/<site>/current  -> versions/<id>
    kits/<federation>/<role>/<site>/previous -> versions/<id>   (rollback)
    kits/defaults.json                        "<role>/<site>" -> federation chosen by `kit use`
    pins/<federation>.json                    root-CA fingerprint pinned at the first pull

A new kit is unpacked and checked in a staging directory on the same filesystem, fsynced, moved
into versions/, and only then does `current` switch, by renaming a new symlink over the old one
(atomic on POSIX): a reader sees the old kit or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hpcfed import names, paths
from hpcfed.errors import ConfigError, KitError, NotFound
from hpcfed.kit.checks import METADATA, KitFacts
from hpcfed.tunnel.files import write_private

ROLES = ("client", "server", "admin", "node", "researcher")  # NVFlare, Fed-BioMed


@dataclass(frozen=True)
class InstalledKit:
    path: str  # the kit's real directory (mount this into the container)
    federation: str
    site: str
    role: str
    server_host: Optional[str]
    server_port: Optional[int]
    gpu_capacity: Optional[int]
    root_fingerprint: str
    not_after: str
    name: str = ""  # the certificate's CN (site, server name or admin e-mail)
    organization: Optional[str] = None
    dashboard: Optional[str] = None
    installed_at: Optional[str] = None
    has_previous: bool = False

    def to_dict(self) -> Dict:
        return asdict(self)


def kits_dir() -> Path:
    return paths.data_dir() / "kits"


def pins_dir() -> Path:
    return paths.data_dir() / "pins"


def check_name(kind: str, value: str) -> str:
    """A federation or site label of a kit (an admin kit's label may be an e-mail address)."""
    return names.check_name(kind, value, email=True)


def _site_dir(federation: str, role: str, site: str) -> Path:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return kits_dir() / check_name("federation", federation) / role / check_name("site", site)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private(root: Path) -> None:
    """Directories 0700; files 0600 (0700 for the kit's shell scripts)."""
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in files:
            p = os.path.join(folder, name)
            os.chmod(p, 0o700 if name.endswith(".sh") else 0o600)


def staging_dir() -> Path:
    """A fresh private directory on the same filesystem as the kits (so the final move is a rename)."""
    base = paths.private_mkdir(kits_dir() / ".staging")
    path = base / f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def _locked(base: Path):
    """One writer per site kit at a time (two pulls at once must not prune each other's version)."""
    fd = os.open(base / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install_kit(
    kit_root: Path, facts: KitFacts, site: str, dashboard: Optional[str] = None
) -> InstalledKit:
    """Move an unpacked, already verified kit into place and make it current (see module doc)."""
    base = _site_dir(facts.federation, facts.role, site)
    versions = paths.private_mkdir(base / "versions")
    for parent in (base, base.parent, base.parent.parent, kits_dir()):
        os.chmod(parent, 0o700)
    now = dt.datetime.now(dt.timezone.utc)
    meta = {
        "federation": facts.federation,
        "site": site,
        "role": facts.role,
        "dashboard": dashboard,
        "installed_at": now.isoformat(timespec="seconds"),
        "facts": asdict(facts),
    }
    write_private(kit_root / METADATA, json.dumps(meta, indent=2, sort_keys=True))
    make_private(kit_root)
    _fsync_tree(kit_root)
    version = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    with _locked(base):
        os.rename(kit_root, versions / version)
        _fsync_dir(versions)
        current = base / "current"
        old = os.readlink(current) if current.is_symlink() else None
        _swap_link(current, f"versions/{version}")
        if old:
            _swap_link(base / "previous", old)
        _fsync_dir(base)
        _prune(base)
        return _load(base)


def _prune(base: Path) -> None:
    """Keep only the versions `current` and `previous` point to."""
    keep = {
        os.path.basename(os.readlink(base / n))
        for n in ("current", "previous")
        if (base / n).is_symlink()
    }
    for entry in (base / "versions").iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def rollback(federation: str, role: str, site: str) -> InstalledKit:
    """Swap `current` and `previous` (undo the last pull)."""
    base = _site_dir(federation, role, site)
    if not (base / "previous").is_symlink():
        raise NotFound(
            f"no previous {role} kit for site {site!r} of federation {federation!r} to roll back to"
        )
    with _locked(base):
        cur, prev = os.readlink(base / "current"), os.readlink(base / "previous")
        _swap_link(base / "current", prev)
        _swap_link(base / "previous", cur)
        _fsync_dir(base)
        return _load(base)


def _load(base: Path) -> InstalledKit:
    real = (base / "current").resolve()
    meta = json.loads((real / METADATA).read_text())
    facts = meta["facts"]
    return InstalledKit(
        path=str(real),
        federation=meta["federation"],
        site=meta["site"],
        role=meta["role"],
        server_host=facts.get("server_host"),
        server_port=facts.get("server_port"),
        gpu_capacity=facts.get("gpu_capacity"),
        root_fingerprint=facts["root_fingerprint"],
        not_after=facts["not_after"],
        name=facts.get("name", ""),
        organization=facts.get("organization"),
        dashboard=meta.get("dashboard"),
        installed_at=meta.get("installed_at"),
        has_previous=(base / "previous").is_symlink(),
    )


def list_kits(site: Optional[str] = None, role: Optional[str] = None) -> List[InstalledKit]:
    out: List[InstalledKit] = []
    root = kits_dir()
    if not root.is_dir():
        return out
    for current in sorted(root.glob("*/*/*/current")):
        base = current.parent
        if (site and base.name != site) or (role and base.parent.name != role):
            continue
        try:
            out.append(_load(base))
        except (OSError, ValueError, KeyError):
            continue  # a kit whose metadata is unreadable is not offered to anyone
    return out


def _defaults_file() -> Path:
    return kits_dir() / "defaults.json"


def _defaults() -> Dict[str, str]:
    try:
        return json.loads(_defaults_file().read_text())
    except (OSError, ValueError):
        return {}


def set_default(site: str, role: str, federation: str) -> InstalledKit:
    """Make the kit of `federation` the one used for `site` and `role` (`hpcfed kit use`)."""
    base = _site_dir(federation, role, site)
    if not (base / "current").is_symlink():
        raise NotFound(
            f"no {role} kit for site {site!r} of federation {federation!r}; see `hpcfed kit list`"
        )
    defaults = _defaults()
    defaults[f"{role}/{site}"] = federation
    paths.private_mkdir(kits_dir())
    write_private(_defaults_file(), json.dumps(defaults, indent=2, sort_keys=True))
    return _load(base)


def find_kit(site: str, role: str = "client") -> Optional[InstalledKit]:
    """The kit a deployment of `role` at `site` uses, or None when there is none.

    With kits from several federations for the same site, the one chosen by `hpcfed kit use`
    wins; without a choice that is ambiguous and raises KitError.
    """
    kits = list_kits(site=site, role=role)
    if not kits:
        return None
    if len(kits) == 1:
        return kits[0]
    chosen = _defaults().get(f"{role}/{site}")
    for kit in kits:
        if kit.federation == chosen:
            return kit
    feds = ", ".join(k.federation for k in kits)
    raise KitError(
        f"site {site!r} has {role} kits from several federations ({feds}); "
        f"choose one with `hpcfed kit use {site} --role {role} --federation NAME`"
    )


# --- trust on first use ----------------------------------------------------------------------
def get_pin(federation: str) -> Optional[Dict]:
    try:
        return json.loads((pins_dir() / f"{check_name('federation', federation)}.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KitError(
            f"the pin file for federation {federation!r} is unreadable ({exc}); remove it to re-pin"
        ) from None


def pins_for_dashboard(dashboard: str) -> List[Dict]:
    out = []
    if pins_dir().is_dir():
        for path in sorted(pins_dir().glob("*.json")):
            try:
                pin = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if pin.get("dashboard") == dashboard:
                out.append(pin)
    return out


def set_pin(
    federation: str,
    fingerprint: str,
    subject: str,
    dashboard: Optional[str],
    signed_folders: Sequence[str] = (),
) -> Dict:
    pin = {
        "federation": federation,
        "fingerprint": fingerprint,
        "subject": subject,
        "dashboard": dashboard,
        # this federation's kits were signed there (NVFlare <= 2.7): `kit verify` requires it
        "signed_folders": sorted(signed_folders),
        "pinned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    paths.private_mkdir(pins_dir())
    write_private(
        pins_dir() / f"{check_name('federation', federation)}.json", json.dumps(pin, indent=2)
    )
    return pin
