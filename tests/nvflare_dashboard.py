"""A REAL NVFlare dashboard on loopback for the kit tests (and the kit benchmark).

It runs the dashboard's own Flask app under gunicorn (what `nvflare dashboard --start` runs
inside Docker; no Docker engine here), then configures it only through its public REST API,
the way a project admin and site researchers do in the browser: set up the project, register
users and sites, approve them, freeze. See /work/shared/notes/nvflare-dashboard-and-kits.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import requests

ADMIN_EMAIL = "admin@fed.test"
API_BASES = ("/nvflare-dashboard/api/v1", "/api/v1")  # NVFlare 2.6+, 2.5 and older


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Dashboard:
    """A running dashboard: its URL, the project admin's password, the gunicorn process."""

    url: str
    admin_password: str
    web_root: str
    proc: subprocess.Popen
    passphrase: str = ""  # NVFL_DASHBOARD_PP: encrypts the root-CA key in the database
    fl_port: int = 0
    api: str = API_BASES[0]
    ca_file: str = ""  # https: the self-signed certificate clients must trust
    users: dict = field(default_factory=dict)  # email -> password
    orgs: dict = field(default_factory=dict)  # email -> organisation

    # --- REST helpers (the browser's calls) -----------------------------------------------
    def login(self, email: str, password: str) -> str:
        r = requests.post(
            self.url + self.api + "/login",
            json={"email": email, "password": password},
            timeout=30,
            verify=self.verify,
        )
        r.raise_for_status()
        return r.json()["access_token"]

    def call(self, method: str, path: str, token: Optional[str] = None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(
            method,
            self.url + self.api + path,
            headers=headers,
            timeout=60,
            verify=self.verify,
            **kw,
        )

    @property
    def verify(self):
        return self.ca_file or True

    def admin(self) -> str:
        return self.login(ADMIN_EMAIL, self.admin_password)

    def setup_project(
        self, short_name: str, server: str = "localhost", fl_port: Optional[int] = None
    ) -> None:
        self.fl_port = fl_port or free_port()
        body = {
            "short_name": short_name,
            "title": f"{short_name} test federation",
            "server1": server,
        }
        if self.api == API_BASES[0]:
            body["server_props"] = {"fed_learn_port": self.fl_port, "admin_port": self.fl_port}
        else:  # 2.5 and older: ports are fixed
            self.fl_port = 8002
        r = self.call("PATCH", "/project", self.admin(), json=body)
        r.raise_for_status()

    def add_user(self, email: str, org: str, role: str = "org_admin", approve: bool = True) -> int:
        password = secrets.token_hex(8)
        body = {
            "email": email,
            "password": password,
            "name": email.split("@")[0],
            "organization": org,
            "role": role,
        }
        r = self.call("POST", "/users", json=body)
        assert r.status_code == 201, r.text
        uid = r.json()["user"]["id"]
        self.users[email] = password
        self.orgs[email] = org
        if approve:
            self.call(
                "PATCH", f"/users/{uid}", self.admin(), json={"approval_state": 100}
            ).raise_for_status()
        return uid

    def add_site(self, email: str, name: str, gpus: int = 0, approve: bool = True) -> int:
        token = self.login(email, self.users[email])
        org = self.orgs[email]
        body = {
            "name": name,
            "organization": org,
            "capacity": {"num_of_gpus": gpus, "mem_per_gpu_in_GiB": 16 if gpus else 0},
            "description": "",
        }
        r = self.call("POST", "/clients", token, json=body)
        assert r.status_code == 201, r.text
        cid = r.json()["client"]["id"]
        if approve:
            self.approve_site(cid)
        return cid

    def approve_site(self, cid: int) -> None:
        self.call(
            "PATCH", f"/clients/{cid}", self.admin(), json={"approval_state": 100}
        ).raise_for_status()

    def freeze(self) -> None:
        self.call("PATCH", "/project", self.admin(), json={"frozen": True}).raise_for_status()

    def root_ca_key(self):
        """The federation's root-CA private key, from the dashboard's database (tests only: lets a
        test sign a kit the way NVFlare <= 2.7 did, with this very root)."""
        import sqlite3

        from cryptography.hazmat.primitives import serialization

        with sqlite3.connect(os.path.join(self.web_root, "db.sqlite")) as db:
            (pem,) = db.execute("select root_key from project").fetchone()
        pem = pem.encode() if isinstance(pem, str) else pem
        return serialization.load_pem_private_key(pem, password=self.passphrase.encode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.web_root, ignore_errors=True)


def _self_signed(web_root: str, host: str) -> tuple[str, str]:
    """A certificate for `host` (an IP address) and its key, 0600 in the dashboard's folder."""
    cert, key = os.path.join(web_root, "tls.crt"), os.path.join(web_root, "tls.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=nvflare-dashboard",
         "-addext", f"subjectAltName=IP:{host}"],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return cert, key


def start_dashboard(
    timeout: float = 60,
    nvflare_root: Optional[str] = None,
    host: str = "127.0.0.1",
    tls: bool = False,
) -> Dashboard:
    """Start a fresh dashboard (new database, so a new root CA) on a free port of `host`
    (loopback, or the Docker test cluster's "internet" network for its login nodes). `tls`:
    https with a self-signed certificate (`Dashboard.ca_file`), as a real dashboard is served.

    `nvflare_root`: a folder holding another nvflare version's package (pip install --no-deps
    --target), run with this venv's Flask & co; default: the installed nvflare.
    """
    web_root = tempfile.mkdtemp(prefix="hpcfed-dashboard-")
    port = free_port(host)
    admin_password = secrets.token_hex(12)
    passphrase = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        NVFL_WEB_ROOT=web_root,
        NVFL_CREDENTIAL=f"{ADMIN_EMAIL}:{admin_password}:fedadmin",
        SECRET_KEY=secrets.token_hex(32),  # fixed for this process: tokens stay valid
        NVFL_DASHBOARD_PP=passphrase,
    )
    if nvflare_root:
        env["PYTHONPATH"] = nvflare_root
        dash_dir = os.path.join(nvflare_root, "nvflare", "dashboard")
    else:
        import nvflare

        dash_dir = os.path.join(os.path.dirname(nvflare.__file__), "dashboard")
    ca_file, tls_args = "", []
    if tls:
        ca_file, key = _self_signed(web_root, host)
        tls_args = ["--certfile", ca_file, "--keyfile", key]
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        *tls_args,
        "-w",
        "1",
        "--no-control-socket",
        "-b",
        f"{host}:{port}",
        "--pythonpath",
        dash_dir,
        "nvflare.dashboard.wsgi:app",
    ]
    log = open(os.path.join(web_root, "gunicorn.log"), "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=web_root)
    dash = Dashboard(
        url=f"{'https' if tls else 'http'}://{host}:{port}",
        admin_password=admin_password,
        web_root=web_root,
        proc=proc,
        passphrase=passphrase,
        ca_file=ca_file,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"dashboard exited: {open(log.name, errors='replace').read()[-2000:]}"
            )
        for base in API_BASES:
            try:
                if requests.get(dash.url + base + "/project", timeout=2, verify=dash.verify).ok:
                    dash.api = base
                    return dash
            except requests.RequestException:
                pass
        time.sleep(0.2)
    dash.stop()
    raise RuntimeError(f"dashboard did not answer within {timeout}s")
