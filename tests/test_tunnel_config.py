"""Tunnel config files, forward specs and keys: what a user types, and the one-line errors they get.

Pure parsing plus the real CLI on files (no network); fast, no root.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import hpcfed

from hpcfed.errors import ConfigError
from hpcfed.tunnel import config, forwards, keys
from hpcfed.tunnel.runner import RunOptions, build_spec

PRIV = keys.generate_private()
PUB = keys.public_from_private(keys.generate_private())
PSK = keys.generate_psk()

GOOD = f"""
# a peer config as `hpcfed hub genconf` writes it, plus the private key
[Interface]
PrivateKey = {PRIV}
Address = 10.221.0.7/32
DNS = 1.1.1.1

[Peer]
PublicKey = {PUB}
PresharedKey = {PSK}
Endpoint = hub.example.org:51820
AllowedIPs = 10.220.0.0/14
PersistentKeepalive = 25
"""


def test_standard_config_is_read():
    cfg = config.parse(GOOD, "site.conf")
    assert str(cfg.address) == "10.221.0.7/32"
    assert cfg.peer_public_key == PUB and cfg.preshared_key == PSK
    assert cfg.endpoint == "hub.example.org:51820" and cfg.endpoint_port == 51820
    assert [str(n) for n in cfg.allowed_ips] == ["10.220.0.0/14"]
    assert cfg.keepalive == 25
    assert PRIV not in repr(cfg), "the private key must not show up in logs/reprs"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("PrivateKey = " + PRIV, "PrivateKey = nope"),
            "site.conf:4: PrivateKey is not a base64 WireGuard key",
        ),
        (
            ("Address = 10.221.0.7/32", "Address = 10.221.0.300/32"),
            "Address '10.221.0.300/32' is not an IP",
        ),
        (
            ("Endpoint = hub.example.org:51820", "Endpoint = hub.example.org"),
            "Endpoint must be HOST:PORT",
        ),
        (
            ("PersistentKeepalive = 25", "PersistentKeepalive = soon"),
            "PersistentKeepalive must be a number",
        ),
        (("AllowedIPs = 10.220.0.0/14", "AllowedIPs = ten"), "AllowedIPs 'ten' is not a network"),
        (("DNS = 1.1.1.1", "Colour = blue"), "unknown [Interface] key 'Colour'"),
        (("[Peer]", "[Peers]"), "unknown section [peers]"),
        (("Endpoint = hub.example.org:51820", ""), "[Peer] has no Endpoint"),
    ],
)
def test_bad_config_names_file_line_and_key(change, message):
    with pytest.raises(ConfigError) as exc:
        config.parse(GOOD.replace(*change), "site.conf")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_two_peers_are_refused():
    with pytest.raises(ConfigError, match="exactly one \\[Peer\\]"):
        config.parse(GOOD + f"\n[Peer]\nPublicKey = {PUB}\nEndpoint = a:1\n", "x.conf")


def test_forward_specs():
    assert forwards.parse_local("8002=10.220.0.2:8002") == forwards.LocalForward(
        "127.0.0.1", 8002, "10.220.0.2", 8002
    )
    assert forwards.parse_local("0.0.0.0:9=10.220.0.2:8003").bind == "0.0.0.0"
    assert forwards.parse_remote("8002=127.0.0.1:18002") == forwards.RemoteForward(
        8002, "127.0.0.1", 18002
    )
    for bad, msg in [
        ("8002", "expected"),
        ("x=10.220.0.2:1", "'x' is not a port"),
        ("1=server:1", "not a tunnel IPv4 address"),
        ("1=10.220.0.2:70000", "not a port"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            forwards.parse_local(bad)
    with pytest.raises(ConfigError, match="is not a port"):
        forwards.parse_remote("0=127.0.0.1:1")


def test_spec_checks_forward_targets_against_allowed_ips():
    cfg = config.parse(GOOD, "site.conf")
    spec = build_spec(
        cfg,
        [forwards.parse_local("8002=10.220.0.2:8002")],
        [forwards.parse_remote("9=127.0.0.1:9")],
        RunOptions(),
    )
    assert spec["address"] == "10.221.0.7" and spec["prefix"] == 32 and spec["private_key"] == PRIV
    with pytest.raises(ConfigError, match="outside the hub peer's AllowedIPs"):
        build_spec(cfg, [forwards.parse_local("8002=192.168.1.1:8002")], [], RunOptions())
    with pytest.raises(ConfigError, match="forwarded twice"):
        build_spec(
            cfg,
            [forwards.parse_local("1=10.220.0.2:1"), forwards.parse_local("1=10.220.0.2:2")],
            [],
            RunOptions(),
        )


def test_keys_roundtrip_with_wg_format():
    priv = keys.generate_private()
    assert keys.is_key(priv) and keys.is_key(keys.public_from_private(priv))
    assert not keys.is_key("abc") and not keys.is_key("!" * 44)


def test_cli_refuses_world_readable_config(tmp_path):
    conf = tmp_path / "site.conf"
    conf.write_text(GOOD)
    os.chmod(conf, 0o644)
    proc = hpcfed("tunnel", "up", "--config", str(conf))
    assert proc.returncode == 3
    assert (
        proc.stderr.strip()
        == f"hpcfed: error: {conf}: holds a private key but is readable by others (mode 644); run: chmod 600 {conf}"
    )


def test_cli_bad_forward_is_one_line_exit_3(tmp_path):
    conf = tmp_path / "site.conf"
    conf.write_text(GOOD)
    os.chmod(conf, 0o600)
    proc = hpcfed("tunnel", "up", "--config", str(conf), "-L", "8002=10.220.0.2")
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
    assert "-L '8002=10.220.0.2': expected [bind:]port=tunnel_ip:port" in proc.stderr


def test_keygen_into_config_prints_only_the_public_key(tmp_path):
    conf = tmp_path / "site.conf"
    conf.write_text(GOOD.replace(f"PrivateKey = {PRIV}\n", ""))
    proc = hpcfed("vpn", "keygen", "--config", str(conf), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    cfg = config.load(conf)  # also proves the file is now 0600
    assert out["public_key"] == keys.public_from_private(cfg.private_key)
    assert cfg.private_key not in proc.stdout + proc.stderr
    assert hpcfed("vpn", "pubkey", "--config", str(conf)).stdout.strip() == out["public_key"]
    again = hpcfed("vpn", "keygen", "--config", str(conf))
    assert again.returncode == 3 and "already has a PrivateKey" in again.stderr


def test_keygen_private_key_file_is_0600(tmp_path):
    target = tmp_path / "k" / "private.key"
    target.parent.mkdir()
    proc = hpcfed("vpn", "keygen", "--private-key-file", str(target))
    assert proc.returncode == 0
    assert target.stat().st_mode & 0o777 == 0o600
    assert keys.public_from_private(target.read_text().strip()) == proc.stdout.strip()


def test_status_without_tunnels(tmp_path):
    proc = hpcfed("tunnel", "status", "--json", env={"XDG_STATE_HOME": str(tmp_path)})
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    missing = hpcfed("tunnel", "status", "--status-file", str(tmp_path / "none.json"))
    assert missing.returncode == 8


def test_job_wiring_argv_and_hosts():
    from hpcfed.tunnel import job

    srv = job.tunnel_argv("s.conf", (), ("8002=127.0.0.1:8002",), "/t/ready", 60)
    assert srv[-2:] == ["-R", "8002=127.0.0.1:8002"]
    # the child's own handshake timeout ends before the supervisor stops waiting
    assert srv[srv.index("--handshake-timeout") + 1] == "30"
    cli = job.tunnel_argv("c.conf", ("127.0.0.1:8002=10.220.0.2:8002",), (), "/t/r", 5, "/t/s")
    assert cli[-2:] == ["-L", "127.0.0.1:8002=10.220.0.2:8002"] and "--status-file" in cli
    assert cli[cli.index("--handshake-timeout") + 1] == "3"
    text = job.hosts_text((("fl-server", "127.0.0.1"),))
    assert "127.0.0.1 fl-server\n" in text and text.startswith("127.0.0.1 localhost\n")


def test_job_wait_ready_reports_no_egress(tmp_path):
    """A real tunnel child whose hub never answers: the supervisor gets the distinct message."""
    from hpcfed.errors import TunnelError
    from hpcfed.tunnel import job

    conf = tmp_path / "site.conf"
    conf.write_text(GOOD.replace("hub.example.org:51820", "127.0.0.1:9"))
    os.chmod(conf, 0o600)
    ready = str(tmp_path / "ready")
    argv = job.tunnel_argv(
        str(conf), ("39999=10.220.0.2:39999",), (), ready, 3, str(tmp_path / "status")
    )
    child = job.TunnelChild.start(argv, ready)
    with pytest.raises(TunnelError, match="^no UDP egress to the hub 127.0.0.1:9"):
        child.wait_ready(timeout=20)
    assert child.exited() == 9


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--liveness", "1e300"), ("--liveness", "inf"), ("--handshake-timeout", "nan")],
)
def test_timer_values_the_data_plane_cannot_hold(tmp_path, flag, value):
    """`--liveness 1e300` used to panic inside Rust and end in a traceback."""
    conf = tmp_path / "site.conf"
    conf.write_text(GOOD)
    os.chmod(conf, 0o600)
    proc = hpcfed("tunnel", "up", "--config", str(conf), flag, value)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and flag in proc.stderr
    assert "Traceback" not in proc.stderr and "panic" not in proc.stderr


def test_job_wait_ready_on_a_plain_child(tmp_path):
    """wait_ready also serves callers that start the child themselves (the Flower console)."""
    import subprocess

    from hpcfed.errors import TunnelError
    from hpcfed.tunnel import job

    conf = tmp_path / "site.conf"
    conf.write_text(GOOD.replace("hub.example.org:51820", "127.0.0.1:9"))
    os.chmod(conf, 0o600)
    ready = str(tmp_path / "ready")
    argv = job.tunnel_argv(str(conf), ("39997=10.220.0.2:39997",), (), ready, 3)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    with pytest.raises(TunnelError, match="^no UDP egress to the hub 127.0.0.1:9"):
        job.wait_ready(proc, ready, timeout=20)
    assert proc.wait() == 9
