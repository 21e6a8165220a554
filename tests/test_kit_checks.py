"""The pure parts of hpcfed.kit on hand-made kits: archive safety, expiry, legacy layouts, store.

No dashboard here: these kits are built with `cryptography` in the layout the notes record, to
reach cases a healthy dashboard never produces (hostile zips, expiring certificates, NVFlare 2.7
address fields, a crash in the middle of an install). test_kit.py covers the real dashboard.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from helpers import need

from hpcfed.errors import KitError
from hpcfed.kit import store
from hpcfed.kit.archive import unpack_kit
from hpcfed.kit.checks import verify_kit
from hpcfed.kit.workspace import check_gpu_capacity

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn, org="orga"):
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        ]
    )


def _cert(subject, issuer, pub, signer, days=360, ca=False):
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signer, hashes.SHA256())


def make_kit(path: Path, site="site-1", fed="fedx", days=360, config=None, gpus=None) -> Path:
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = _cert(_name(fed), _name(fed), root_key.public_key(), root_key, ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = _cert(_name(site), _name(fed), key.public_key(), root_key, days=days)
    (path / "startup").mkdir(parents=True)
    (path / "local").mkdir()
    pem = serialization.Encoding.PEM
    (path / "startup" / "rootCA.pem").write_bytes(root.public_bytes(pem))
    (path / "startup" / "client.crt").write_bytes(leaf.public_bytes(pem))
    (path / "startup" / "client.key").write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    os.chmod(path / "startup" / "client.key", 0o600)
    config = config or {
        "servers": [{"service": {"target": "fl.example.org:8002"}}],
        "client": {"fqsn": site},
    }
    (path / "startup" / "fed_client.json").write_text(json.dumps(config))
    if gpus is not None:
        comp = {
            "id": "resource_manager",
            "path": "x.GPUResourceManager",
            "args": {"num_of_gpus": gpus},
        }
        (path / "local" / "resources.json.default").write_text(json.dumps({"components": [comp]}))
    return path


def zip_bytes(entries, pin=None):
    """entries: name -> bytes (or None for a directory); plain zip (pin only marks the flag)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data or b"")
    return buf.getvalue()


# --- checks -------------------------------------------------------------------------------------
def test_facts_from_a_2_9_kit(tmp_path):
    report = verify_kit(make_kit(tmp_path / "k", gpus=4), expected_name="site-1")
    assert report.ok, report.errors
    f = report.facts
    assert (f.role, f.name, f.federation, f.server_host, f.server_port, f.gpu_capacity) == (
        "client",
        "site-1",
        "fedx",
        "fl.example.org",
        8002,
        4,
    )
    assert f.root_fingerprint.startswith("sha256:") and not f.signed


def test_nvflare_2_7_address_is_read_from_the_overseer_end_point(tmp_path):
    config = {
        "overseer_agent": {"args": {"sp_end_point": "server1.fed.org:8102:8103"}},
        "client": {},
    }
    report = verify_kit(make_kit(tmp_path / "k", config=config))
    assert (report.facts.server_host, report.facts.server_port) == ("server1.fed.org", 8102)


def test_expiry_warns_30_days_ahead_and_refuses_after(tmp_path):
    kit = make_kit(tmp_path / "k", days=20)
    report = verify_kit(kit)
    assert report.ok and any("expires on" in w for w in report.warnings)
    later = verify_kit(kit, now=NOW + dt.timedelta(days=21))
    assert not later.ok and any("client.crt expired on" in e for e in later.errors)


def test_world_readable_key_is_a_warning(tmp_path):
    kit = make_kit(tmp_path / "k")
    os.chmod(kit / "startup" / "client.key", 0o644)
    assert any("readable by others" in w for w in verify_kit(kit).warnings)


def test_symlink_in_kit_is_refused(tmp_path):
    kit = make_kit(tmp_path / "k")
    os.symlink("/etc/passwd", kit / "local" / "privacy.json")
    assert any("symbolic link" in e for e in verify_kit(kit).errors)


def test_not_a_kit(tmp_path):
    report = verify_kit(tmp_path)
    assert not report.ok and "no startup/ folder" in report.errors[0]


# --- archive ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "startup/../../evil"])
def test_unpack_refuses_paths_outside_the_target(tmp_path, name):
    data = zip_bytes({"startup/fed_client.json": b"{}", name: b"x"})
    (tmp_path / "t").mkdir()
    with pytest.raises(KitError, match="unsafe path"):
        unpack_kit(data, tmp_path / "t", None)
    assert not (tmp_path / "evil.txt").exists()


def test_unpack_refuses_symlinks(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("startup/rootCA.pem")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/ssl/private/key.pem")
    with pytest.raises(KitError, match="symbolic link"):
        unpack_kit(buf.getvalue(), tmp_path, None)


def test_unpack_not_a_zip_and_json_status(tmp_path):
    with pytest.raises(KitError, match="not a zip"):
        unpack_kit(b'{"status": "not approved yet"}', tmp_path, "PIN")


def test_unpack_wrong_pin_is_a_kit_error(tmp_path):
    import shutil
    import subprocess

    need(
        shutil.which("zip") is not None,
        "needs the zip binary to make a PIN-encrypted archive like the dashboard does",
    )
    kit = make_kit(tmp_path / "src")
    subprocess.run(
        ["zip", "-rq", "-P", "RIGHTPIN", str(tmp_path / "k.zip"), "."], cwd=kit, check=True
    )
    data = (tmp_path / "k.zip").read_bytes()
    (tmp_path / "a").mkdir()
    with pytest.raises(KitError, match="cannot decrypt"):
        unpack_kit(data, tmp_path / "a", "WRONGPIN")
    (tmp_path / "b").mkdir()
    root = unpack_kit(data, tmp_path / "b", "RIGHTPIN")
    assert verify_kit(root, expected_name="site-1").ok
    assert stat.S_IMODE((root / "startup" / "client.key").stat().st_mode) == 0o600


def test_unpack_strips_one_top_level_folder_of_older_kits(tmp_path):
    data = zip_bytes({"site-1/startup/fed_client.json": b"{}", "site-1/readme.txt": b""})
    assert unpack_kit(data, tmp_path, None) == tmp_path / "site-1"


def test_unpack_refuses_a_duplicate_member(tmp_path):
    # zipfile warns about the duplicate name but writes it: a dashboard could send it too
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = zip_bytes({"startup/fed_client.json": b"{}"})
        buf = io.BytesIO(data)
        with zipfile.ZipFile(buf, "a") as z:
            z.writestr("startup/fed_client.json", b'{"evil": 1}')
    with pytest.raises(KitError, match="holds 'startup/fed_client.json' twice"):
        unpack_kit(buf.getvalue(), tmp_path, None)
    assert not (tmp_path / "startup").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "entries",
    [
        {"startup/local": b"x", "startup/local/x.json": b"{}"},  # file, then a folder
        {"startup/local/x.json": b"{}", "startup/local": b"x"},  # folder, then a file
        {"startup/a/": None, "startup/a": b"x"},  # an explicit folder entry
    ],
)
def test_unpack_refuses_a_file_folder_clash(tmp_path, entries):
    with pytest.raises(KitError, match="'startup/(local|a)' as both a file and a folder"):
        unpack_kit(zip_bytes(entries), tmp_path, None)


# --- store --------------------------------------------------------------------------------------
@pytest.fixture
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


def _install(tmp_path, site="site-1", fed="fedx", n=0):
    kit = make_kit(tmp_path / f"src-{fed}-{n}", site=site, fed=fed)
    report = verify_kit(kit)
    staging = store.staging_dir() / "kit"
    os.rename(kit, staging)
    return store.install_kit(staging, report.facts, site=site)


def test_find_kit_none_one_and_ambiguous(data_home):
    assert store.find_kit("site-1") is None
    a = _install(data_home, fed="feda")
    assert store.find_kit("site-1") == a
    _install(data_home, fed="fedb")
    with pytest.raises(KitError, match="several federations.*kit use"):
        store.find_kit("site-1")
    store.set_default("site-1", "client", "fedb")
    assert store.find_kit("site-1").federation == "fedb"


def test_failed_install_leaves_the_current_kit(data_home, monkeypatch):
    first = _install(data_home, n=1)

    def crash(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_swap_link", crash)
    with pytest.raises(OSError):
        _install(data_home, n=2)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home / "data"))
    assert store.find_kit("site-1").path == first.path
    assert verify_kit(first.path).ok


def test_concurrent_installs_leave_a_valid_current_and_previous(data_home):
    import threading

    kits = []
    for n in range(6):
        kit = make_kit(data_home / f"c{n}", fed="fedc")
        staging = store.staging_dir() / "kit"
        os.rename(kit, staging)
        kits.append((staging, verify_kit(staging).facts))
    threads = [
        threading.Thread(target=store.install_kit, args=(k, f), kwargs={"site": "site-1"})
        for k, f in kits
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    current = store.find_kit("site-1")
    assert verify_kit(current.path).ok and current.has_previous
    base = Path(current.path).parent.parent
    assert (base / "previous").resolve().is_dir()
    assert len(list((base / "versions").iterdir())) == 2


def test_names_with_slashes_are_refused(data_home):
    from hpcfed.errors import ConfigError

    with pytest.raises(ConfigError, match="not a valid name"):
        store.check_name("site", "../../etc")


# --- workspace ----------------------------------------------------------------------------------
def test_prepare_workspace_refuses_an_expired_kit(tmp_path):
    from hpcfed.kit.workspace import prepare_workspace

    kit = make_kit(tmp_path / "k", days=-0.5)  # valid since yesterday, expired 12 hours ago
    with pytest.raises(KitError, match="client.crt expired on"):
        prepare_workspace(str(kit), str(tmp_path / "job"), "client", gpus=0)
    ok = make_kit(tmp_path / "k2", gpus=1)
    assert Path(prepare_workspace(str(ok), str(tmp_path / "job2"), "client", gpus=1)).is_dir()


def test_gpu_capacity_rule():
    check_gpu_capacity(None, 0)
    check_gpu_capacity(2, 4)  # fewer declared than given: harmless
    check_gpu_capacity(2, 2)
    with pytest.raises(KitError, match="declares 4 GPU.*has 2.*exit 0"):
        check_gpu_capacity(4, 2)
