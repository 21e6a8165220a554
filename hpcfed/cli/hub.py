"""`hpcfed hub`: the WireGuard hub every tunnel dials, and its peer registry (root, on the hub)."""

from __future__ import annotations

import click

from hpcfed.cli._common import emit, json_option, progress, table
from hpcfed.errors import ConfigError

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Registry directory (default $HPCFED_HUB_DIR or /var/lib/hpcfed/hub).",
)
TYPES = click.Choice(["server", "client", "admin"])


def _registry(directory):
    from hpcfed.hub.registry import Registry, hub_dir

    return Registry(hub_dir(directory))


def _drop_live(reg, keys) -> None:
    """Take keys off the live interface (if it is up)."""
    from hpcfed.hub import wg

    h = reg.hub()
    if wg.is_live(h.interface):
        for k in keys:
            wg.remove_peer(h, k)


@click.group()
def hub():
    """The hub: a machine with a public address joining all sites' tunnels (root allowed there).

    \b
    Example:
      hpcfed hub init --endpoint hub.example.org:51820
      hpcfed hub up
      hpcfed hub genconf server fl-server
      hpcfed hub add server fl-server <public key printed by `hpcfed vpn keygen`>
      hpcfed hub list
    """


@hub.command("init")
@click.option("--endpoint", required=True, help="HOST:PORT peers dial (UDP).")
@click.option("--interface", default="hpcfed0", show_default=True, help="WireGuard interface name.")
@click.option(
    "--listen-port",
    type=click.IntRange(1, 65535),
    help="UDP port to listen on (default: the endpoint's port).",
)
@click.option(
    "--keepalive",
    default=25,
    show_default=True,
    type=click.IntRange(0, 3600),
    help="Hub-to-peer keepalive seconds (lets tunnels tell a live hub from a restarted one); 0 = off.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing hub key (every peer config must be re-issued).",
)
@dir_option
@json_option
def init(endpoint, interface, listen_port, keepalive, force, directory, as_json):
    """Create the hub's key and settings.

    \b
    Example:
      hpcfed hub init --endpoint hub.example.org:51820
    """
    from hpcfed.tunnel.config import parse_endpoint

    parse_endpoint(endpoint, "--endpoint")
    if len(interface) > 15 or not interface.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--interface {interface!r}: at most 15 letters, digits, '-' or '_'")
    reg = _registry(directory)
    h = reg.init(
        endpoint, interface, listen_port or int(endpoint.rsplit(":", 1)[1]), keepalive, force
    )
    emit(
        {"dir": str(reg.dir), **h.__dict__},
        as_json,
        lambda d: click.echo(f"hub initialised in {d['dir']}; public key {d['public_key']}"),
    )


@hub.command("up")
@click.option(
    "--userspace", is_flag=True, help="Use wireguard-go even when the kernel has WireGuard."
)
@dir_option
@json_option
def up_cmd(userspace, directory, as_json):
    """Bring the interface up and restore every registered peer (e.g. after a reboot).

    \b
    Example:
      hpcfed hub up
    """
    from hpcfed.hub import wg

    reg = _registry(directory)
    h = reg.hub()
    peers = reg.peers()
    progress(
        f"bringing up {h.interface} on UDP {h.listen_port} with {sum(len(p.keys) for p in peers)} peer key(s)"
    )
    impl = wg.up(h, reg.private_key(), peers, userspace)
    emit(
        {"interface": h.interface, "implementation": impl, "peers": len(peers)},
        as_json,
        lambda d: click.echo(f"{d['interface']} up ({d['implementation']}), {d['peers']} peer(s)"),
    )


@hub.command("down")
@dir_option
def down_cmd(directory):
    """Delete the live interface (the registry stays; `hpcfed hub up` restores it).

    \b
    Example:
      hpcfed hub down
    """
    from hpcfed.hub import wg

    h = _registry(directory).hub()
    click.echo(f"{h.interface} {'removed' if wg.down(h.interface) else 'was not up'}")


@hub.command("genconf")
@click.argument("type_", metavar="TYPE", type=TYPES)
@click.argument("peer_id", metavar="ID")
@dir_option
@json_option
def genconf(type_, peer_id, directory, as_json):
    """Allocate the next address of TYPE's prefix and a PSK; write the config to hand to the site.

    \b
    Example:
      hpcfed hub genconf client site1     # then send peers/client/site1/wg.conf to site1
    """
    peer, path = _registry(directory).genconf(type_, peer_id)
    emit(
        {**peer.public(), "config": str(path)},
        as_json,
        lambda d: click.echo(f"{d['type']} {d['id']}: {d['address']}; config {d['config']}"),
    )


@hub.command("add")
@click.argument("type_", metavar="TYPE", type=TYPES)
@click.argument("peer_id", metavar="ID")
@click.argument("public_key", metavar="PUBKEY")
@dir_option
@json_option
def add(type_, peer_id, public_key, directory, as_json):
    """Register a site's public key (replaces a previous key: the address follows the new key).

    \b
    Example:
      hpcfed hub add client site1 'kX3...='
    """
    from hpcfed.hub import wg

    reg = _registry(directory)
    peer, replaced = reg.add_key(type_, peer_id, public_key)
    h = reg.hub()
    live = wg.is_live(h.interface)
    if live:
        for k in replaced:
            wg.remove_peer(h, k)
        wg.set_peer(h, peer, public_key)
    emit(
        {**peer.public(), "replaced": replaced, "applied": live},
        as_json,
        lambda d: click.echo(
            f"{type_} {peer_id} ({d['address']}) key added"
            + (f", replaced {len(replaced)} old key(s)" if replaced else "")
            + ("" if live else f"; {h.interface} is not up: `hpcfed hub up` applies it")
        ),
    )


@hub.command("remove")
@click.argument("type_", metavar="TYPE", type=TYPES)
@click.argument("peer_id", metavar="ID")
@dir_option
def remove(type_, peer_id, directory):
    """Drop a peer's keys (it can no longer connect) but keep its config and address.

    \b
    Example:
      hpcfed hub remove client site1
    """
    reg = _registry(directory)
    peer = reg.remove_keys(type_, peer_id)
    _drop_live(reg, peer.keys)
    click.echo(f"{type_} {peer_id}: removed {len(peer.keys)} key(s); config kept")


@hub.command("removeconf")
@click.argument("type_", metavar="TYPE", type=TYPES)
@click.argument("peer_id", metavar="ID")
@dir_option
def removeconf(type_, peer_id, directory):
    """Delete a peer entirely: keys, address and config.

    \b
    Example:
      hpcfed hub removeconf client site1
    """
    reg = _registry(directory)
    peer = reg.removeconf(type_, peer_id)
    _drop_live(reg, peer.keys)
    click.echo(f"{type_} {peer_id}: config and {len(peer.keys)} key(s) removed")


@hub.command("list")
@dir_option
@json_option
def list_cmd(directory, as_json):
    """List peers: type, id, prefix, address, keys, and live endpoint/handshake when up.

    \b
    Example:
      hpcfed hub list --json
    """
    from hpcfed.hub import wg

    reg = _registry(directory)
    h = reg.hub()
    live = wg.live_peers(h.interface)
    rows = []
    for p in reg.peers():
        d = p.public()
        d["live"] = {k: live[k] for k in p.keys if k in live}
        rows.append(d)

    def human(items):
        click.echo(
            table(
                [
                    (
                        d["type"],
                        d["id"],
                        d["prefix"],
                        d["address"],
                        ",".join(d["keys"]) or "-",
                        ",".join(filter(None, (v["endpoint"] for v in d["live"].values()))) or "-",
                    )
                    for d in items
                ],
                ["TYPE", "ID", "PREFIX", "ADDRESS", "KEYS", "ENDPOINT"],
            )
        )

    emit(rows, as_json, human)
