"""A client for the NVFlare dashboard's REST API (the calls its web pages make).

Verified facts (see docs/kits.md): the API lives under /nvflare-dashboard/api/v1 from NVFlare 2.6
and under /api/v1 before; tokens last 30 minutes and carry the approval state of the moment of
login; several failures answer HTTP 200 (`{"status": "not approved yet"}`), so a download counts
only when the body is a zip.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

import requests

from hpcfed.errors import ConfigError, KitError, NotFound
from hpcfed.kit.archive import is_zip

API_BASES = ("/nvflare-dashboard/api/v1", "/api/v1")  # 2.6+, then 2.5 and older
PIN_ALPHABET = string.ascii_uppercase + string.digits  # the dashboard accepts ^[A-Za-z0-9]+$
MAX_DOWNLOAD = 512 * 1024 * 1024  # bytes of one kit download (kit pull --max-download)


def new_pin(length: int = 12) -> str:
    """A fresh one-time PIN for one download; never printed or logged."""
    return "".join(secrets.choice(PIN_ALPHABET) for _ in range(length))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_url(url: str, insecure_http: bool = False) -> str:
    """The dashboard's base URL, or ConfigError: https only (plain http only to loopback, with
    --insecure-http), and never with credentials in it (they would be printed and stored)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None:
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        raise ConfigError(
            f"dashboard URL {shown}: remove the user:password@ part (the password comes from "
            "HPCFED_DASHBOARD_PASSWORD, the keyring or a prompt; the e-mail from --user)"
        )
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"dashboard URL {url!r} is not an https URL (e.g. https://dashboard.example.org)"
        )
    if parts.scheme == "http":
        if not insecure_http:
            raise ConfigError(
                f"dashboard URL {url}: plain http would carry your password, the kit's private key "
                "and its download PIN in clear; use https (--insecure-http allows http to a "
                "dashboard on this machine only)"
            )
        if not _is_loopback(host):
            raise ConfigError(
                f"dashboard URL {url}: --insecure-http is only for a dashboard on loopback "
                "(localhost, 127.0.0.0/8, ::1); use https"
            )
    for base in API_BASES:
        if url.endswith(base):
            url = url[: -len(base)]
    return url


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def parse_size(text: str) -> int:
    """`512M`, `1G`, `64K`, `1048576` -> bytes (binary units); ValueError otherwise."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if factor > 1 else t
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 1G, 64K)")
    return int(number) * factor


@dataclass(frozen=True)
class Login:
    token: str
    user_id: int
    email: str
    role: str  # project_admin, org_admin, lead, member
    organization: Optional[str]
    approved: bool


def _claims(token: str) -> Dict[str, Any]:
    """The JWT's claims, read without verifying (only to show the user their own org/approval)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}


class Dashboard:
    def __init__(
        self,
        url: str,
        timeout: float = 120,
        verify_tls: bool = True,
        insecure_http: bool = False,
        max_download: int = MAX_DOWNLOAD,
    ):
        self.url = normalise_url(url, insecure_http)
        self.timeout = timeout
        self.max_download = max_download
        self.session = requests.Session()
        self.session.verify = verify_tls
        self.api = self._detect_api()

    # --- plumbing -------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        login: Optional[Login] = None,
        base: Optional[str] = None,
        **kw,
    ):
        headers = {"Authorization": f"Bearer {login.token}"} if login else {}
        url = self.url + (base if base is not None else self.api) + path
        try:
            return self.session.request(method, url, headers=headers, timeout=self.timeout, **kw)
        except requests.exceptions.SSLError as exc:
            raise KitError(f"TLS check of dashboard {self.url} failed: {exc}") from None
        except requests.RequestException as exc:
            raise KitError(
                f"cannot reach the dashboard at {self.url}: {type(exc).__name__}"
            ) from None

    @staticmethod
    def _json(resp) -> Dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _detect_api(self) -> str:
        for base in API_BASES:
            resp = self._request("GET", "/project", base=base)
            if resp.status_code == 200 and "project" in self._json(resp):
                return base
        raise KitError(
            f"{self.url} does not look like an NVFlare dashboard "
            f"(no project at {API_BASES[0]} or {API_BASES[1]})"
        )

    def _auth_failed(self, resp, login: Login, action: str) -> None:
        if resp.status_code in (401, 422):
            raise KitError(
                f"the dashboard rejected the login of {login.email} while trying to {action}; log in again"
            )
        if resp.status_code == 403:
            status = self._json(resp).get("status", "")
            if "approved" in status:
                raise KitError(
                    f"the dashboard account {login.email} is not approved yet: "
                    f"ask the project admin to approve it at {self.url}, then pull again"
                )
            raise KitError(
                f"the dashboard does not allow {login.email} to {action} (HTTP 403 {status})"
            )

    def _read_capped(self, resp: Any, who: str) -> bytes:
        """The response body, refused as soon as it passes max_download bytes (never buffered
        whole first: a broken or hostile dashboard must not fill memory or disk)."""
        chunks, total = [], 0
        try:
            for chunk in resp.iter_content(chunk_size=1 << 16):
                total += len(chunk)
                if total > self.max_download:
                    raise KitError(
                        f"the kit download for {who} from {self.url} is larger than "
                        f"{_size(self.max_download)}; refusing it (kit pull --max-download)"
                    )
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise KitError(
                f"the kit download from {self.url} broke off: {type(exc).__name__}"
            ) from None
        finally:
            resp.close()
        body = b"".join(chunks)
        resp._content = body  # where requests keeps a read body: .json() works on it again
        return body

    # --- API ------------------------------------------------------------------------------
    def project(self) -> Dict[str, Any]:
        return self._json(self._request("GET", "/project")).get("project") or {}

    def login(self, email: str, password: str) -> Login:
        resp = self._request("POST", "/login", json={"email": email, "password": password})
        data = self._json(resp)
        if resp.status_code == 401 or data.get("status") == "unauthenticated":
            raise KitError(
                f"the dashboard at {self.url} refused the login of {email}: wrong e-mail or password"
            )
        if resp.status_code != 200 or "access_token" not in data:
            raise KitError(f"login at {self.url} failed: HTTP {resp.status_code}")
        user = data.get("user") or {}
        claims = _claims(data["access_token"])
        return Login(
            token=data["access_token"],
            user_id=int(user.get("id", 0)),
            email=user.get("email", email),
            role=user.get("role") or claims.get("role", ""),
            organization=claims.get("organization"),
            approved=bool(claims.get("approved", False)),
        )

    def sites(self, login: Login) -> List[Dict[str, Any]]:
        resp = self._request("GET", "/clients", login)
        self._auth_failed(resp, login, "list sites")
        return self._json(resp).get("client_list") or []

    def find_site(self, login: Login, name: str) -> Optional[Dict[str, Any]]:
        for site in self.sites(login):
            if site.get("name") == name:
                return site
        return None

    def register_site(
        self, login: Login, name: str, org: str, gpus: int, mem_per_gpu_gib: int
    ) -> Dict[str, Any]:
        body = {
            "name": name,
            "organization": org,
            # the provisioner reads num_of_gpus (num_gpus is silently ignored)
            "capacity": {"num_of_gpus": gpus, "mem_per_gpu_in_GiB": mem_per_gpu_gib},
            "description": "registered by hpcfed kit pull --register",
        }
        resp = self._request("POST", "/clients", login, json=body)
        self._auth_failed(resp, login, f"register site {name}")
        if resp.status_code == 409:
            raise KitError(f"site {name!r} is already registered on {self.url} (by another user?)")
        if resp.status_code != 201:
            raise KitError(f"registering site {name!r} failed: HTTP {resp.status_code}")
        return self._json(resp).get("client") or {}

    def download(
        self, login: Login, role: str, pin: str, site: Optional[Dict[str, Any]] = None
    ) -> bytes:
        """The kit zip for a client site, the server, or the logged-in admin user."""
        if role == "client":
            if site is None:
                raise KitError("a client kit download needs the site's dashboard entry")
            path, who = f"/clients/{site['id']}/blob", f"site {site.get('name')!r}"
        elif role == "server":
            if login.role != "project_admin":
                raise KitError(
                    f"only the project admin can download the server kit; {login.email} is {login.role or 'not an admin'}"
                )
            path, who = "/servers/1/blob", "the server"
        else:
            path, who = f"/users/{login.user_id}/blob", f"user {login.email}"
        resp = self._request("POST", path, login, json={"pin": pin}, stream=True)
        body = self._read_capped(resp, who)
        if resp.status_code == 200 and is_zip(body):
            return body
        status = self._json(resp).get("status", "")
        if "not approved" in status:  # HTTP 200 with a JSON body: looks like success, is not
            raise KitError(
                f"{who} is not approved yet on {self.url}: ask the project admin to approve it, then pull again"
            )
        self._auth_failed(resp, login, f"download the kit of {who}")
        if resp.status_code == 404:
            raise NotFound(f"{who} does not exist on {self.url}")
        if resp.status_code >= 500 and not self.project().get("frozen"):
            raise KitError(
                f"project on {self.url} is not frozen yet: ask the project admin to freeze it, then pull again"
            )
        ctype = resp.headers.get("Content-Type", "?")
        raise KitError(
            f"the dashboard answered the kit download for {who} with HTTP {resp.status_code} ({ctype}), not a zip"
        )
