"""`hpcfed kit`: startup kits from the federation's NVFlare dashboard."""

from __future__ import annotations

import os
import sys

import click

from hpcfed.cli._common import emit, json_option, progress, table
from hpcfed.errors import ConfigError, KitError, NotFound

PASSWORD_ENV = "HPCFED_DASHBOARD_PASSWORD"
KEYRING_SERVICE = "hpcfed-dashboard"
ROLE = click.Choice(["client", "server", "admin", "node", "researcher"])  # NVFlare, Fed-BioMed


@click.group()
def kit():
    """Startup kits: pull them from the NVFlare dashboard, check them, choose them.

    \b
    Example:
      export HPCFED_DASHBOARD_PASSWORD=...   # or keyring, or a prompt
      hpcfed kit pull --dashboard https://flare.example.org --user me@lab.org --site site-1
      hpcfed kit list
    """


def _password(url: str, email: str) -> str:
    """Environment, then the keyring (when installed), then a hidden prompt; never an argument."""
    value = os.environ.get(PASSWORD_ENV)
    if value:
        return value
    try:
        import keyring  # optional

        value = keyring.get_password(KEYRING_SERVICE, f"{email}@{url}") or keyring.get_password(
            KEYRING_SERVICE, email
        )
        if value:
            return value
    except Exception:  # keyring absent or without a usable backend
        pass
    if sys.stdin.isatty():
        return click.prompt(f"Dashboard password for {email}", hide_input=True)
    raise ConfigError(
        f"no dashboard password: set {PASSWORD_ENV}, store it with "
        f"`keyring set {KEYRING_SERVICE} {email}`, or run in a terminal to be prompted"
    )


def _profile_capacity(name: str):
    """(GPUs, GiB per GPU) of a site profile, for --register without --gpus; None if unknown."""
    try:
        from hpcfed.profiles.loader import load_site

        gpus = load_site(name).profile.gpus
    except Exception:
        return None
    mem = getattr(gpus, "mem_per_gpu", None) or 0
    return gpus.max_per_node, int(mem // 1024)


def _human_kit(k: dict) -> None:
    rows = [
        ("federation", k["federation"]),
        ("site", k["site"]),
        ("role", k["role"]),
        ("certificate name", k.get("name")),
        ("server", f"{k.get('server_host')}:{k.get('server_port')}"),
        ("GPU capacity", k.get("gpu_capacity")),
        ("expires", k.get("not_after")),
        ("root CA", k.get("root_fingerprint")),
        ("path", k.get("path")),
    ]
    click.echo(table(rows, ["", ""]).split("\n", 1)[1])


@kit.command()
@click.option(
    "--dashboard",
    "url",
    envvar="HPCFED_DASHBOARD_URL",
    required=True,
    metavar="URL",
    help="The dashboard's URL (env HPCFED_DASHBOARD_URL).",
)
@click.option(
    "--user",
    "email",
    envvar="HPCFED_DASHBOARD_USER",
    required=True,
    metavar="EMAIL",
    help="Your dashboard login e-mail (env HPCFED_DASHBOARD_USER).",
)
@click.option(
    "--site",
    metavar="NAME",
    help="Client: the site's dashboard name. Server/admin: name to store the kit under.",
)
@click.option(
    "--as",
    "store_as",
    metavar="SITE",
    help="Store the kit for this hpcfed site (profile) name instead of --site, e.g. when the "
    "dashboard calls the site differently.",
)
@click.option("--role", type=ROLE, default="client", show_default=True)
@click.option("--org", metavar="ORG", help="Organisation for --register (default: your account's).")
@click.option(
    "--register", is_flag=True, help="Register the site first if the dashboard does not know it."
)
@click.option(
    "--gpus",
    type=click.IntRange(0),
    help="GPU capacity to register (default: the site profile's gpus.max_per_node).",
)
@click.option(
    "--profile",
    metavar="SITE",
    help="Site profile to take the GPU capacity from (default: --as, else --site).",
)
@click.option(
    "--repin",
    is_flag=True,
    help="Accept a new root CA for this federation (only after the admin confirms it changed).",
)
@click.option(
    "--insecure-http",
    is_flag=True,
    help="Allow a plain http:// dashboard URL, and only on loopback (a local test dashboard).",
)
@click.option(
    "--max-download",
    metavar="SIZE",
    default="512M",
    show_default=True,
    help="Refuse a kit download larger than this (K, M, G).",
)
@json_option
def pull(
    url,
    email,
    site,
    store_as,
    role,
    org,
    register,
    gpus,
    profile,
    repin,
    insecure_http,
    max_download,
    as_json,
):
    """Download, check and install the startup kit for a site.

    The password comes from HPCFED_DASHBOARD_PASSWORD, the keyring, or a prompt. The download
    PIN is generated fresh and never shown. The federation's root CA is pinned at the first
    pull; a later kit with a different root is refused unless --repin.

    \b
    Example:
      hpcfed kit pull --dashboard https://flare.example.org --user me@lab.org --site site-1
      hpcfed kit pull --dashboard https://flare.example.org --user me@lab.org --site site-1 --register --gpus 4
      hpcfed kit pull --dashboard https://flare.example.org --user admin@lab.org --role server --site hub
      hpcfed kit pull --dashboard https://flare.example.org --user me@lab.org --site ohsu-gpu-1 --as ohsu
    """
    from hpcfed.kit.dashboard import normalise_url, parse_size
    from hpcfed.kit.pull import PullPlan, pull_kit

    try:
        limit = parse_size(max_download)
    except ValueError as exc:
        raise ConfigError(f"--max-download {exc}") from None
    mem = 0
    if register and gpus is None:
        capacity = _profile_capacity(profile or store_as or site or "")
        if capacity is None:
            raise ConfigError(
                f"--register needs --gpus N (no site profile {profile or site!r} to take it from)"
            )
        gpus, mem = capacity
    plan = PullPlan(
        dashboard=url,
        site=site,
        role=role,
        email=email,
        org=org,
        register=register,
        gpus=gpus,
        mem_per_gpu_gib=mem,
        repin=repin,
        store_as=store_as,
        insecure_http=insecure_http,
        max_download=limit,
    )
    normalise_url(url, insecure_http)  # refuse a bad URL before asking for a password
    result = pull_kit(plan, _password(url, email), progress=progress)
    for warning in result.report.warnings:
        progress(f"warning: {warning}")
    if result.pinned == "new":
        progress(
            f"pinned the root CA of federation {result.kit.federation} on first use: {result.kit.root_fingerprint}"
        )
    elif result.pinned == "replaced":
        progress(
            f"re-pinned the root CA of federation {result.kit.federation}: {result.kit.root_fingerprint}"
        )
    data = dict(result.kit.to_dict(), pinned=result.pinned, warnings=result.report.warnings)
    emit(
        data,
        as_json,
        lambda d: (
            click.echo(f"installed {d['role']} kit for {d['site']} ({d['federation']})"),
            _human_kit(d),
        ),
    )


@kit.command("import")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--site", required=True, metavar="NAME", help="Name to store the kit under.")
@click.option(
    "--expect-name",
    metavar="CN",
    help="Name the certificate must carry (default: --site for client kits).",
)
@click.option("--repin", is_flag=True, help="Accept a new root CA for this federation.")
@json_option
def import_(directory, site, expect_name, repin, as_json):
    """Install an unpacked kit handed over out of band (e.g. from `nvflare provision`).

    Runs the same checks and pinning as `pull`; nothing is installed when one fails.

    \b
    Example:
      hpcfed kit import ./site-1 --site site-1
    """
    from pathlib import Path

    from hpcfed.kit.checks import detect_role
    from hpcfed.kit.pull import import_kit

    if expect_name is None and detect_role(Path(directory)) == "client":
        expect_name = site
    result = import_kit(directory, site, expected_name=expect_name, repin=repin)
    for warning in result.report.warnings:
        progress(f"warning: {warning}")
    data = dict(result.kit.to_dict(), pinned=result.pinned, warnings=result.report.warnings)
    emit(
        data,
        as_json,
        lambda d: (
            click.echo(f"installed {d['role']} kit for {d['site']} ({d['federation']})"),
            _human_kit(d),
        ),
    )


@kit.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--site",
    "name",
    metavar="NAME",
    help="Name the certificate must carry (site, server name or e-mail).",
)
@click.option("--no-pin", is_flag=True, help="Do not compare the root CA with the pinned one.")
@json_option
def verify(directory, name, no_pin, as_json):
    """Check a kit: chain to its root CA, key matches certificate, name, expiry, pin, signatures.

    Exit code 0 when every check passed, 6 when one failed (all problems are listed).

    \b
    Example:
      hpcfed kit verify ~/site-1 --site site-1
      hpcfed kit verify "$(hpcfed kit show site-1 --json | jq -r .path)" --json
    """
    from hpcfed.kit.pull import verify_with_pin

    if not os.path.isdir(directory):
        raise NotFound(f"{directory}: no such directory")
    report, _ = verify_with_pin(directory, expected_name=name, use_pin=not no_pin)

    def human(r: dict) -> None:
        for check, passed in r["checks"].items():
            click.echo(f"{'ok  ' if passed else 'FAIL'}  {check}")
        for w in r["warnings"]:
            click.echo(f"warning: {w}")
        for e in r["errors"]:
            click.echo(f"error: {e}")
        if r["facts"]:
            f = r["facts"]
            click.echo(
                f"{f['role']} kit for {f['name']} in federation {f['federation']}, "
                f"server {f['server_host']}:{f['server_port']}, expires {f['not_after']}"
            )

    emit(report.to_dict(), as_json, human)
    if not report.ok:
        raise KitError(f"{directory}: {len(report.errors)} check(s) failed")


@kit.command("list")
@json_option
def list_(as_json):
    """List installed kits: federation, site, role, expiry, root fingerprint.

    \b
    Example:
      hpcfed kit list --json
    """
    from hpcfed.kit.store import list_kits

    kits = [k.to_dict() for k in list_kits()]

    def human(rows):
        if not rows:
            click.echo("no kits installed; get one with `hpcfed kit pull`")
            return
        click.echo(
            table(
                [
                    (
                        k["federation"],
                        k["site"],
                        k["role"],
                        f"{k['server_host']}:{k['server_port']}",
                        k["gpu_capacity"],
                        k["not_after"][:10],
                        k["root_fingerprint"][:23] + "...",
                    )
                    for k in rows
                ],
                ["FEDERATION", "SITE", "ROLE", "SERVER", "GPUS", "EXPIRES", "ROOT CA"],
            )
        )

    emit(kits, as_json, human)


@kit.command()
@click.argument("site")
@click.option("--role", type=ROLE, default="client", show_default=True)
@json_option
def show(site, role, as_json):
    """Show the kit a deployment of SITE uses (the one `hpcfed submit` picks).

    \b
    Example:
      hpcfed kit show site-1
      hpcfed kit show hub --role server --json
    """
    from hpcfed.kit.store import find_kit

    found = find_kit(site, role)
    if found is None:
        raise NotFound(
            f"no {role} kit for site {site!r}; get one with `hpcfed kit pull --site {site}`"
        )
    emit(found.to_dict(), as_json, _human_kit)


@kit.command()
@click.argument("site")
@click.option("--role", type=ROLE, default="client", show_default=True)
@click.option("--federation", metavar="NAME", help="Use this federation's kit for SITE.")
@click.option("--rollback", is_flag=True, help="Go back to the kit installed before the last pull.")
@json_option
def use(site, role, federation, rollback, as_json):
    """Choose which kit deployments of SITE use: another federation's, or the previous one.

    \b
    Example:
      hpcfed kit use site-1 --federation cancer-fl
      hpcfed kit use site-1 --rollback
    """
    from hpcfed.kit import store

    if not rollback and not federation:
        raise ConfigError("say what to use: --federation NAME or --rollback")
    if not federation:
        current = store.find_kit(site, role)
        if current is None:
            raise NotFound(f"no {role} kit for site {site!r}")
        federation = current.federation
    chosen = (
        store.rollback(federation, role, site)
        if rollback
        else store.set_default(site, role, federation)
    )
    if rollback:
        store.set_default(site, role, federation)
    emit(chosen.to_dict(), as_json, _human_kit)


# ---------------------------------------------------------------- Flower (no dashboard)
@kit.group()
def flower():
    """Flower credentials: the operator's CA and server certificate, each site's own key.

    \b
    Example (operator):  hpcfed kit flower ca --federation fed1 --server-name fl-server
    Example (a site):    hpcfed kit flower keygen --federation fed1 --site hospital-a \\
                           --ca ca.crt --server fl-server:9093
    Example (operator):  hpcfed kit flower register site.pub --site hospital-a --image SIF \\
                           --tunnel-config admin.wg.conf --server-ip 10.0.0.2
    """


@flower.command("ca")
@click.option("--federation", required=True, help="The federation's name.")
@click.option("--server-name", required=True, help="The name SuperNodes dial (in the certificate).")
@click.option("--port", type=int, default=9093, show_default=True, help="The SuperLink's port.")
@json_option
def flower_ca(federation, server_name, port, as_json):
    """Create the federation's CA and the SuperLink's server certificate (operator)."""
    from hpcfed.kit import flower as fl

    out = fl.make_ca(federation, server_name, port)
    emit(
        out,
        as_json,
        lambda d: click.echo(
            f"federation {d['federation']}: server {d['server_name']}:{d['port']}\n"
            f"CA certificate (give it to the sites): {d['ca']}\n"
            f"CA fingerprint: {d['ca_fingerprint']}\n"
            f"SuperLink credentials (its --kit): {d['superlink_kit']}"
        ),
    )


@flower.command("keygen")
@click.option("--federation", required=True, help="The federation's name.")
@click.option("--site", required=True, help="This site's name (its SuperNode's --site).")
@click.option("--ca", "ca_file", required=True, help="The federation's CA certificate.")
@click.option("--server", required=True, help="The federation's server NAME:PORT.")
@json_option
def flower_keygen(federation, site, ca_file, server, as_json):
    """Create this site's SuperNode key here; only the public key goes to the operator."""
    from hpcfed.kit import flower as fl

    out = fl.keygen(federation, site, ca_file, server)
    emit(
        out,
        as_json,
        lambda d: click.echo(
            f"SuperNode key of {d['site']} made in {d['kit']} (the private key stays there)\n"
            f"send this public key to the operator: {d['public_key']}\n"
            f"check the CA fingerprint with the operator: {d['ca_fingerprint']}"
        ),
    )


def _console_options(f):
    for option in reversed(
        [
            click.option(
                "--federation", default=None, help="The federation (default: the only one)."
            ),
            click.option(
                "--image", default=None, help="Run flwr in this image (Flower superlink)."
            ),
            click.option(
                "--tunnel-config", default=None, help="Reach the SuperLink through a tunnel peer."
            ),
            click.option("--server-ip", default=None, help="The SuperLink's tunnel address."),
        ]
    ):
        f = option(f)
    return f


def _console(federation, image, tunnel_config, server_ip):
    from hpcfed.kit import flower as fl

    name, _ = fl.federation_of(federation)
    return fl.Console(name, image=image, tunnel_config=tunnel_config, server_ip=server_ip)


def _flwr_or_fail(console, args, inputs=(), stream=None):
    from hpcfed.kit import flower as fl

    code, out = fl.run_flwr(console, args, inputs=inputs, stream=stream)
    answer = _json_tail(out)
    if code == 0 and answer.get("success") is False:  # flwr's JSON errors exit 0
        message = " ".join(str(answer.get("error-message", "")).split())
        raise KitError(f"flwr {' '.join(args[:2])} failed: {message}")
    if code != 0:
        raise KitError(f"flwr {' '.join(args[:2])} failed (exit {code}): {_why(out)}")
    return out


def _why(out: str) -> str:
    """flwr's message without its box drawing: the last line that says something."""
    for line in reversed(out.strip().splitlines()):
        text = line.strip(" │╭╮╰╯─\t")
        if any(c.isalpha() for c in text) and not text.startswith("Error"):
            return text
    return "no output"


def _json_tail(out: str):
    import json

    start = out.find("{")
    try:
        return json.loads(out[start:]) if start >= 0 else {}
    except ValueError:
        return {"output": out}


@flower.command("register")
@click.argument("public_key")
@click.option("--site", required=True, help="The site's name (shown by list).")
@_console_options
@json_option
def flower_register(public_key, site, federation, image, tunnel_config, server_ip, as_json):
    """Register a site's SuperNode public key with the SuperLink (operator)."""
    if not os.path.isfile(public_key):
        raise NotFound(f"{public_key}: no such file")
    console = _console(federation, image, tunnel_config, server_ip)
    from hpcfed.kit.flower import INPUT_DIR

    where = f"{INPUT_DIR}/site.pub" if image else os.path.abspath(public_key)
    out = _flwr_or_fail(
        console,
        ["supernode", "register", where, console.federation, "--name", site, "--format", "json"],
        inputs=((public_key, "site.pub"),),
    )
    emit(_json_tail(out), as_json, lambda d: click.echo(f"registered {site}: {d}"))


@flower.command("list")
@_console_options
@json_option
def flower_list(federation, image, tunnel_config, server_ip, as_json):
    """The SuperNodes the SuperLink knows, with their status (operator)."""
    console = _console(federation, image, tunnel_config, server_ip)
    out = _flwr_or_fail(console, ["supernode", "list", console.federation, "--format", "json"])
    emit(_json_tail(out), as_json, lambda d: click.echo(json_dumps(d)))


@flower.command("unregister")
@click.argument("node_id")
@_console_options
@json_option
def flower_unregister(node_id, federation, image, tunnel_config, server_ip, as_json):
    """Remove a SuperNode from the federation (operator)."""
    console = _console(federation, image, tunnel_config, server_ip)
    out = _flwr_or_fail(console, ["supernode", "unregister", node_id, console.federation])
    emit(
        {"unregistered": node_id, "output": out.strip()}, as_json, lambda d: click.echo(d["output"])
    )


@flower.command("flwr", context_settings={"ignore_unknown_options": True})
@_console_options
@click.option(
    "--app", default=None, help="A Flower app directory, at /fl/workspace/in/app in the image."
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def flower_flwr(federation, image, tunnel_config, server_ip, app, args):
    """Run the operator's `flwr ARGS` against the SuperLink, e.g. `--app DIR -- run /fl/workspace/in/app --stream`."""
    from hpcfed.kit import flower as fl

    console = _console(federation, image, tunnel_config, server_ip)
    inputs = ((app, "app"),) if app else ()
    args = [a.replace("{federation}", console.federation) for a in args]
    code, _ = fl.run_flwr(console, list(args), inputs=inputs, stream=click.echo)
    sys.exit(code)


def json_dumps(d) -> str:
    import json

    return json.dumps(d, indent=1)


# Fed-BioMed components are kits too (hpcfed/kit/fedbiomed.py).
from hpcfed.cli.kit_fedbiomed import fedbiomed as _fedbiomed  # noqa: E402

kit.add_command(_fedbiomed)
