"""`hpcfed submit` uses the site's pulled kit: its path, its server name for the container's
/etc/hosts behind the tunnel, and its GPU capacity — against kits from a REAL NVFlare dashboard."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import hpcfed, need, need_module

need_module("nvflare", "needs the nvflare extra (pip install hpcfed[nvflare])")
from nvflare_dashboard import start_dashboard  # noqa: E402

pytestmark = pytest.mark.nvflare

ALICE = "alice@hospital-a.test"
PORT = 18002


@pytest.fixture(scope="module")
def dashboard():
    need(shutil.which("zip") is not None, "the dashboard needs the zip binary")
    dash = start_dashboard()
    try:
        dash.setup_project("wiring", server="fl-server", fl_port=PORT)
        dash.add_user(ALICE, "hospital_a")  # org names: [A-Za-z0-9_]+
        dash.add_site(ALICE, "hospital-a", gpus=2)
        dash.freeze()
        yield dash
    finally:
        dash.stop()


@pytest.fixture(scope="module")
def user_env(dashboard, tmp_path_factory):
    home = tmp_path_factory.mktemp("wiring")
    env = {
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_STATE_HOME": str(home / "state"),
    }
    for role, site, email, password in (
        ("client", "hospital-a", ALICE, dashboard.users[ALICE]),
        ("server", "fl-server", "admin@fed.test", dashboard.admin_password),
    ):
        proc = hpcfed(
            "kit",
            "pull",
            "--insecure-http",
            "--dashboard",
            dashboard.url,
            "--user",
            email,
            "--role",
            role,
            "--site",
            site,
            "--as",
            "local",
            env=dict(env, HPCFED_DASHBOARD_PASSWORD=password),
        )
        assert proc.returncode == 0, proc.stderr
    conf = home / "peer.conf"
    conf.write_text("[Interface]\n")  # only its path goes into the plan on --dry-run
    conf.chmod(0o600)
    env["CONF"] = str(conf)
    return env


def _dry_plan(env, *args):
    proc = hpcfed(
        "submit",
        *args,
        "--site",
        "local",
        "--tunnel-config",
        env["CONF"],
        "--dry-run",
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_client_uses_the_sites_kit_and_maps_the_server_name_to_its_forward(user_env):
    plan = _dry_plan(
        user_env, "client", "--gpus", "2", "-L", f"127.0.11.1:{PORT}=10.220.0.2:{PORT}"
    )["plan"]
    kits = json.loads(hpcfed("kit", "list", "--json", env=user_env).stdout)
    client_kit = next(k for k in kits if k["role"] == "client")
    assert plan["kit"] == client_kit["path"]
    # The name in every certificate must resolve, inside the container, to the local forward.
    assert plan["tunnel"]["hosts"] == [["fl-server", "127.0.11.1"]]


def test_server_name_maps_to_where_its_remote_forward_delivers(user_env):
    plan = _dry_plan(user_env, "server", "--gpus", "0", "-R", f"{PORT}=127.0.0.1:{PORT}")["plan"]
    assert plan["kit"].endswith("/current") or "server" in plan["kit"]
    assert plan["tunnel"]["hosts"] == [["fl-server", "127.0.0.1"]]


def test_kit_declaring_more_gpus_than_the_job_is_refused_before_submitting(user_env):
    proc = hpcfed(
        "submit", "client", "--site", "local", "--gpus", "1", env=user_env
    )  # a real submit
    assert proc.returncode == 6
    assert "declares 2 GPU(s)" in proc.stderr and "--gpus 2" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    status = hpcfed("status", "--json", env=user_env)
    assert json.loads(status.stdout)["deployments"] == []  # nothing recorded, nothing submitted


def test_site_without_a_kit_says_how_to_get_one(user_env):
    proc = hpcfed("submit", "client", "--site", "generic", "--gpus", "1", "--dry-run", env=user_env)
    assert proc.returncode == 8
    assert "no nvflare client kit installed for site generic" in proc.stderr
    assert "hpcfed kit pull" in proc.stderr
