"""`hpcfed tunnel` (the userspace WireGuard tunnel a job runs) and `hpcfed vpn` (its keys)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from hpcfed.cli._common import emit, json_option, table
from hpcfed.errors import ConfigError
from hpcfed.paths import config_dir, private_mkdir
from hpcfed.tunnel.files import write_private


@click.group()
def tunnel():
    """Userspace WireGuard tunnel for a job: no root, no TUN device, only UDP to the hub.

    \b
    Example:
      hpcfed tunnel up --config ~/site.conf -R 8002=127.0.0.1:8002 --ready-file /tmp/tun.ready
      hpcfed tunnel status --json
    """


@tunnel.command("up")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="WireGuard config (0600) with this peer's PrivateKey and the hub as [Peer].",
)
@click.option(
    "-L",
    "local",
    multiple=True,
    metavar="[BIND:]PORT=TUNNEL_IP:PORT",
    help="Listen on BIND:PORT (default 127.0.0.1) and carry each connection to TUNNEL_IP:PORT.",
)
@click.option(
    "-R",
    "remote",
    multiple=True,
    metavar="PORT=HOST:PORT",
    help="Carry connections arriving at this peer's tunnel address on PORT to HOST:PORT here.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Written (atomically) after the first handshake; removed on exit.",
)
@click.option(
    "--status-file",
    type=click.Path(dir_okay=False),
    help="Where to keep counters (default: the state dir, named after the config).",
)
@click.option(
    "--handshake-timeout",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to wait for the first handshake before failing with exit 9.",
)
@click.option(
    "--liveness",
    default=60.0,
    show_default=True,
    type=float,
    help="Re-handshake after this many seconds without hearing from the hub.",
)
@click.option(
    "--allow-other-users",
    is_flag=True,
    help="Accept -L connections from other users of this node (refused by default).",
)
@click.option(
    "--buffer-kib",
    default=256,
    show_default=True,
    type=click.IntRange(16, 16384),
    help="TCP buffer per connection and direction.",
)
@click.option(
    "--max-connections",
    default=1024,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Connections open at once through the -R forwards; more are reset.",
)
def up(
    config_path,
    local,
    remote,
    ready_file,
    status_file,
    handshake_timeout,
    liveness,
    allow_other_users,
    buffer_kib,
    max_connections,
):
    """Run the tunnel in the foreground until SIGTERM/SIGINT.

    Exit codes: 0 stopped by a signal, 3 bad config or forward, 9 tunnel failure (e.g. "no UDP
    egress to the hub" when no handshake happens within --handshake-timeout).

    \b
    Example (server job: the federation port reached through the tunnel):
      hpcfed tunnel up --config server.conf -R 8002=127.0.0.1:8002 --ready-file $TMPDIR/tun.ready
    Example (client job: a local port to the server's tunnel address):
      hpcfed tunnel up --config client.conf -L 127.0.0.1:8002=10.220.0.2:8002
    """
    from hpcfed.tunnel import config, forwards, runner

    cfg = config.load(config_path)
    lf = [forwards.parse_local(s) for s in local]
    rf = [forwards.parse_remote(s) for s in remote]
    opts = runner.RunOptions(
        ready_file,
        status_file,
        handshake_timeout,
        liveness,
        allow_other_users,
        buffer_kib,
        max_connections,
    )
    runner.run(cfg, lf, rf, opts)


@tunnel.command("status")
@click.option(
    "--status-file",
    type=click.Path(dir_okay=False),
    help="Read this status file instead of all in the state dir.",
)
@json_option
def status(status_file, as_json):
    """Show counters of running tunnels: bytes, handshakes, last handshake age, connections.

    \b
    Example:
      hpcfed tunnel status
      hpcfed tunnel status --status-file $TMPDIR/tun.status --json
    """
    from hpcfed.tunnel.status import collect

    rows = collect(status_file)

    def human(items):
        if not items:
            click.echo("no tunnels")
            return
        click.echo(
            table(
                [
                    (
                        i.get("config") or Path(i["status_file"]).stem,
                        i.get("host", "-"),
                        i["state"],
                        i["address"],
                        i["endpoint"],
                        i["handshakes"],
                        "-"
                        if i.get("last_handshake_age_s") is None
                        else f"{i['last_handshake_age_s']:.0f}s",
                        i["tx_bytes"],
                        i["rx_bytes"],
                        i["connections_active"],
                        i["connections_total"],
                        i["connections_refused"],
                    )
                    for i in items
                ],
                [
                    "CONFIG",
                    "HOST",
                    "STATE",
                    "ADDRESS",
                    "HUB",
                    "HANDSHAKES",
                    "LAST HS",
                    "TX",
                    "RX",
                    "CONNS",
                    "TOTAL",
                    "REFUSED",
                ],
            )
        )

    emit(
        rows if status_file is None else rows[0],
        as_json,
        human if status_file is None else (lambda d: human([d])),
    )


@click.group()
def vpn():
    """This peer's WireGuard keys. The private key is made where it is used and never leaves.

    \b
    Example:
      hpcfed vpn keygen --config ~/site.conf   # prints the public key to send to the hub admin
      hpcfed vpn pubkey --config ~/site.conf
    """


_PRIVATE_RE = re.compile(r"^\s*PrivateKey\s*=.*$", re.IGNORECASE | re.MULTILINE)
_INTERFACE_RE = re.compile(r"^\s*\[Interface\]\s*$", re.IGNORECASE | re.MULTILINE)


def _write_key(path: Path, text: str) -> None:
    """write_private, with a path the user cannot write to reported as one line (exit 3)."""
    try:
        write_private(path, text)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot write the private key there: {exc.strerror or exc}"
        ) from None


@vpn.command("keygen")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Put the private key into this peer config (from `hpcfed hub genconf`); made 0600.",
)
@click.option(
    "--private-key-file",
    type=click.Path(dir_okay=False),
    help="Write the private key here instead (0600). Default without --config: CONFIG_DIR/vpn/private.key.",
)
@click.option("--force", is_flag=True, help="Replace an existing private key.")
@json_option
def keygen(config_path, private_key_file, force, as_json):
    """Create this peer's key pair; print only the public key (for `hpcfed hub add`).

    \b
    Example:
      hpcfed vpn keygen --config ~/client-site1.conf
      hpcfed vpn keygen --private-key-file ~/.config/hpcfed/vpn/site1.key --json
    """
    from hpcfed.tunnel import keys

    if config_path and private_key_file:
        raise ConfigError("give --config or --private-key-file, not both")
    private = keys.generate_private()
    if config_path:
        path = Path(config_path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the peer config: {exc.strerror}") from None
        if not _INTERFACE_RE.search(text):
            raise ConfigError(f"{path}: no [Interface] section to put the private key in")
        if _PRIVATE_RE.search(text):
            if not force:
                raise ConfigError(f"{path}: already has a PrivateKey (use --force to replace it)")
            text = _PRIVATE_RE.sub(lambda m: f"PrivateKey = {private}", text, count=1)
        else:
            text = _INTERFACE_RE.sub(
                lambda m: f"{m.group(0)}\nPrivateKey = {private}", text, count=1
            )
        _write_key(path, text)
        target = path
    else:
        if private_key_file:
            target = Path(private_key_file)
        else:
            try:
                target = private_mkdir(config_dir() / "vpn") / "private.key"
            except OSError as exc:
                raise ConfigError(
                    f"{config_dir() / 'vpn'}: cannot create: {exc.strerror or exc}"
                ) from None
        if target.exists() and not force:
            raise ConfigError(f"{target}: already exists (use --force to replace it)")
        _write_key(target, private + "\n")
    public = keys.public_from_private(private)
    emit(
        {"public_key": public, "private_key_in": str(target)},
        as_json,
        lambda d: click.echo(d["public_key"]),
    )


@vpn.command("pubkey")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Peer config holding the PrivateKey.",
)
@json_option
def pubkey(config_path, as_json):
    """Print the public key of the private key in a peer config.

    \b
    Example:
      hpcfed vpn pubkey --config ~/client-site1.conf
    """
    from hpcfed.tunnel import config, keys

    cfg = config.load(config_path)
    emit(
        {"public_key": keys.public_from_private(cfg.private_key)},
        as_json,
        lambda d: click.echo(d["public_key"]),
    )
