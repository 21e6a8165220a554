"""`hpcfed hub` against a live WireGuard interface (wireguard-go in a network namespace).

What the hub admin relies on: addresses come from the type's prefix, each site's config carries
the hub key, a PSK and the endpoint; add/remove/re-register change the live interface at once;
`hub up` after the interface is gone (a reboot) restores every registered peer with its PSK.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from test_tunnel_wireguard import HubNet, need_hub_tools

from hpcfed.tunnel import keys

pytestmark = pytest.mark.wireguard


@pytest.fixture(scope="module")
def hubnet():
    need_hub_tools()
    net = HubNet("hub", 55)
    try:
        net.create()
        yield net
    finally:
        net.destroy()


def _live(net: HubNet) -> dict[str, list[str]]:
    return net.wg_dump()


@pytest.mark.timeout(120)
def test_registry_on_a_live_interface(hubnet):
    net = hubnet
    # nothing initialised yet: a clear "not found"
    proc = net.hub("list", check=False)
    assert proc.returncode == 8 and "hpcfed hub init" in proc.stderr

    info = json.loads(
        net.hub("init", "--endpoint", net.endpoint, "--interface", net.iface, "--json").stdout
    )
    hub_dir = net.dir / "hub"
    assert stat.S_IMODE(hub_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((hub_dir / "private.key").stat().st_mode) == 0o600
    assert info["listen_port"] == 51820 and keys.is_key(info["public_key"])
    again = net.hub("init", "--endpoint", net.endpoint, check=False)
    assert again.returncode == 3 and "already initialised" in again.stderr

    net.hub("up", "--userspace")
    assert _live(net) == {}

    # genconf: next free address of the type's prefix, a PSK, the hub's key and endpoint
    srv = json.loads(net.hub("genconf", "server", "fl-server", "--json").stdout)
    a = json.loads(net.hub("genconf", "client", "site-a", "--json").stdout)
    b = json.loads(net.hub("genconf", "client", "site-b", "--json").stdout)
    assert (srv["address"], a["address"], b["address"]) == (
        "10.220.0.2",
        "10.221.0.1",
        "10.221.0.2",
    )
    conf = open(a["config"]).read()
    assert stat.S_IMODE(os.stat(a["config"]).st_mode) == 0o600
    assert f"PublicKey = {info['public_key']}" in conf and f"Endpoint = {net.endpoint}" in conf
    assert "Address = 10.221.0.1/32" in conf and "PrivateKey" not in conf
    psk_a = next(
        l.split("=", 1)[1].strip() for l in conf.splitlines() if l.startswith("PresharedKey")
    )
    dup = net.hub("genconf", "client", "site-a", check=False)
    assert dup.returncode == 3 and "already has a config" in dup.stderr

    # add: applied to the live interface with the PSK and the /32
    key1 = keys.public_from_private(keys.generate_private())
    key_srv = keys.public_from_private(keys.generate_private())
    net.hub("add", "client", "site-a", key1)
    net.hub("add", "server", "fl-server", key_srv)
    live = _live(net)
    assert live[key1][1] == psk_a and live[key1][3] == "10.221.0.1/32"
    assert live[key_srv][3] == "10.220.0.2/32"
    assert live[key1][7] == "25"  # hub keepalive: lets tunnels tell a live hub from a restarted one

    # re-register with a new key: the address follows the new key, the old one is gone
    key2 = keys.public_from_private(keys.generate_private())
    out = json.loads(net.hub("add", "client", "site-a", key2, "--json").stdout)
    assert out["replaced"] == [key1] and out["applied"] is True
    live = _live(net)
    assert key1 not in live and live[key2][3] == "10.221.0.1/32" and live[key2][1] == psk_a

    listing = {(p["type"], p["id"]): p for p in json.loads(net.hub("list", "--json").stdout)}
    assert listing[("client", "site-a")]["keys"] == [key2]
    assert listing[("client", "site-a")]["prefix"] == "10.221.0.0/16"
    assert "site-b" in net.hub("list").stdout

    # remove keeps the config (it can re-register); removeconf deletes everything
    net.hub("remove", "client", "site-a")
    assert key2 not in _live(net)
    assert os.path.exists(a["config"])
    net.hub("add", "client", "site-a", key2)
    assert key2 in _live(net)
    net.hub("removeconf", "client", "site-b")
    assert not os.path.exists(b["config"])
    assert ("client", "site-b") not in {
        (p["type"], p["id"]) for p in json.loads(net.hub("list", "--json").stdout)
    }
    # the freed address is handed out again
    assert (
        json.loads(net.hub("genconf", "client", "site-c", "--json").stdout)["address"]
        == "10.221.0.2"
    )

    # a reboot: the interface disappears; `hub up` restores every peer with its PSK
    net.hub("down")
    assert net.hub("list", "--json").returncode == 0
    net.hub("up", "--userspace")
    live = _live(net)
    assert set(live) == {key2, key_srv}
    assert live[key2][1] == psk_a and live[key2][3] == "10.221.0.1/32"


@pytest.mark.timeout(60)
def test_bad_input_is_one_line_and_changes_nothing(hubnet):
    net = hubnet
    if not (net.dir / "hub" / "hub.json").exists():
        net.hub("init", "--endpoint", net.endpoint, "--interface", net.iface)
    before = (net.dir / "hub" / "peers.json").read_text()
    cases = [
        (
            ("add", "client", "nobody", keys.public_from_private(keys.generate_private())),
            8,
            "no peer client nobody",
        ),
        (("add", "client", "site-a", "not-a-key"), 3, "is not a base64 WireGuard key"),
        (("genconf", "client", "bad id"), 3, "peer id 'bad id'"),
        (("init", "--endpoint", "nohost", "--force"), 3, "Endpoint must be HOST:PORT"),
    ]
    for args, code, message in cases:
        proc = net.hub(*args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr
    assert (net.dir / "hub" / "peers.json").read_text() == before
