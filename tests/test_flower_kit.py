"""Flower credentials (`hpcfed kit flower`): the operator's CA and server certificate, a site's
own OpenSSH ECDSA key; private files 0600 and never overwritten; submit finds them by site."""

from __future__ import annotations

import json
import os
import stat

import pytest
from helpers import hpcfed


@pytest.fixture
def dirs(tmp_path):
    env = {
        var: str(tmp_path / var.lower())
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
    }
    return env, tmp_path / "xdg_data_home" / "hpcfed" / "flower" / "fed1"


def _ca(env):
    return hpcfed(
        "kit",
        "flower",
        "ca",
        "--federation",
        "fed1",
        "--server-name",
        "fl-server",
        "--json",
        env=env,
    )


def _keygen(env, fed, site="site-a"):
    return hpcfed(
        "kit", "flower", "keygen", "--federation", "fed1", "--site", site,
        "--ca", str(fed / "operator" / "ca.crt"), "--server", "fl-server:9093", "--json", env=env,
    )  # fmt: skip


def test_operator_ca_and_server_certificate(dirs):
    from cryptography import x509

    env, fed = dirs
    proc = _ca(env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["superlink_kit"] == str(fed / "superlink")
    for key in (fed / "operator" / "ca.key", fed / "superlink" / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not (fed / "superlink" / "ca.key").exists()  # the CA key never goes into a job
    cert = x509.load_pem_x509_certificate((fed / "superlink" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # What SuperNodes dial, and loopback for the SuperLink's own helpers.
    assert "fl-server" in sans.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate((fed / "superlink" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    # Made once: a second `ca` never overwrites the federation's keys.
    again = _ca(env)
    assert again.returncode == 3 and "already exists" in again.stderr


def test_site_key_is_openssh_ecdsa_made_at_the_site(dirs):
    from cryptography.hazmat.primitives import serialization

    env, fed = dirs
    assert _ca(env).returncode == 0
    proc = _keygen(env, fed)
    assert proc.returncode == 0, proc.stderr
    site = fed / "supernode" / "site-a"
    key = serialization.load_ssh_private_key((site / "site.key").read_bytes(), None)
    pub = serialization.load_ssh_public_key((site / "site.pub").read_bytes())
    assert key.public_key().public_numbers() == pub.public_numbers()
    assert (site / "site.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE((site / "site.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(site.stat().st_mode) == 0o700
    assert "PRIVATE" not in proc.stdout  # only the public key's path is shown
    again = _keygen(env, fed)
    assert again.returncode == 3 and "already exists" in again.stderr
    assert (
        key.public_key().public_numbers()
        == serialization.load_ssh_private_key((site / "site.key").read_bytes(), None)
        .public_key()
        .public_numbers()
    )


def test_submit_uses_the_site_credentials_and_their_server_address(dirs):
    env, fed = dirs
    assert _ca(env).returncode == 0 and _keygen(env, fed).returncode == 0
    proc = hpcfed("submit", "supernode", "--site", "local", "--dry-run", "--json", env=env)
    assert proc.returncode == 8 and "no Flower supernode credentials for site local" in proc.stderr
    assert _keygen(env, fed, site="local").returncode == 0
    proc = hpcfed("submit", "supernode", "--site", "local", "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert plan["framework"] == "flower" and plan["kit"] == str(fed / "supernode" / "local")
    assert "fl-server:9093" in plan["command"]
    link = json.loads(
        hpcfed("submit", "superlink", "--site", "local", "--dry-run", "--json", env=env).stdout
    )
    assert link["plan"]["kit"] == str(fed / "superlink")
    assert link["plan"]["command"][-2:] == ["--port", "9093"]


def test_keygen_rejects_a_bad_ca_or_server(dirs, tmp_path):
    env, fed = dirs
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    proc = hpcfed(
        "kit", "flower", "keygen", "--federation", "f", "--site", "s", "--ca", str(bad),
        "--server", "fl-server:9093", env=env,
    )  # fmt: skip
    assert proc.returncode == 6 and "not a PEM certificate" in proc.stderr
    proc = hpcfed(
        "kit", "flower", "keygen", "--federation", "f", "--site", "s", "--ca", str(bad),
        "--server", "fl-server", env=env,
    )  # fmt: skip
    assert proc.returncode == 3 and "NAME:PORT" in proc.stderr
    assert not (fed.parent / "f" / "supernode" / "s" / "site.key").exists()
    assert os.path.exists(bad)
