"""`hpcfed kit pull` and `hpcfed kit import`: get a kit, check it, pin its root, install it.

Nothing is installed unless every check passed: the kit is unpacked and verified in a private
staging directory, which is removed whatever happens; only a kit that passed is moved into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from hpcfed.errors import KitError, NotFound
from hpcfed.kit import store
from hpcfed.kit.archive import unpack_kit
from hpcfed.kit.checks import KitFacts, KitReport, require_ok, verify_kit
from hpcfed.kit.dashboard import MAX_DOWNLOAD, Dashboard, new_pin

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PullPlan:
    """What `hpcfed kit pull` will do; built from flags, holds no secret."""

    dashboard: str
    site: Optional[
        str
    ]  # client: the dashboard site name; server/admin: the label to store it under
    role: str = "client"
    email: str = ""
    org: Optional[str] = None
    register: bool = False
    gpus: Optional[int] = None  # capacity to register with
    mem_per_gpu_gib: int = 0
    repin: bool = False
    store_as: Optional[str] = None  # the hpcfed site name to store the kit under, if not --site
    insecure_http: bool = False  # allow http:// to a dashboard on loopback (tests, demos)
    max_download: int = MAX_DOWNLOAD  # bytes; a larger kit download is refused


@dataclass(frozen=True)
class PullResult:
    kit: store.InstalledKit
    report: KitReport
    pinned: str  # "kept", "new" (first use) or "replaced" (--repin)


def _check_pin(facts: KitFacts, dashboard: Optional[str], repin: bool) -> str:
    """Trust on first use; return what happens to the pin, raise when the root is not trusted."""
    pin = store.get_pin(facts.federation)
    if pin is not None:
        if pin["fingerprint"] == facts.root_fingerprint:
            return "kept"
        if not repin:
            raise KitError(
                f"the root CA of federation {facts.federation!r} changed: pinned {pin['fingerprint']} "
                f"on {pin.get('pinned_at', '?')}, the new kit has {facts.root_fingerprint}. Nothing was "
                "installed. If the project admin confirms the federation re-created its CA, pull again with --repin"
            )
        return "replaced"
    if dashboard and not repin:
        for other in store.pins_for_dashboard(dashboard):
            if other.get("federation") != facts.federation:
                raise KitError(
                    f"dashboard {dashboard} was pinned as federation {other['federation']!r} "
                    f"({other['fingerprint']}) but now hands out {facts.federation!r} ({facts.root_fingerprint}); "
                    "nothing was installed. If that is expected, pull again with --repin"
                )
    return "new"


def _install_checked(
    kit_root: Path,
    site: str,
    expected_name: Optional[str],
    dashboard: Optional[str],
    repin: bool,
    what: str,
) -> PullResult:
    report = verify_kit(kit_root, expected_name=expected_name)
    facts = require_ok(report, what)
    pinned = _check_pin(facts, dashboard, repin)
    kit = store.install_kit(kit_root, facts, site=site, dashboard=dashboard)
    if pinned != "kept":
        store.set_pin(
            facts.federation,
            facts.root_fingerprint,
            facts.federation,
            dashboard,
            facts.signed_folders,
        )
    return PullResult(kit=kit, report=report, pinned=pinned)


def pull_kit(plan: PullPlan, password: str, progress: Progress = lambda m: None) -> PullResult:
    dash = Dashboard(
        plan.dashboard, insecure_http=plan.insecure_http, max_download=plan.max_download
    )
    progress(f"logging in to {dash.url} as {plan.email}")
    login = dash.login(plan.email, password)
    project = dash.project()
    if not project.get("frozen"):
        raise KitError(
            f"project {project.get('short_name') or '?'!r} on {dash.url} is not frozen yet: kits exist only "
            "once the project admin freezes the project; ask them to freeze it, then pull again"
        )
    site_entry = None
    expected: Optional[str]
    label: Optional[str]
    if plan.role == "client":
        if not plan.site:
            raise KitError("a client kit needs --site NAME (the site's name on the dashboard)")
        site_entry = dash.find_site(login, plan.site)
        if site_entry is None:
            if not plan.register:
                raise NotFound(
                    f"site {plan.site!r} is not registered on {dash.url}: register it there, "
                    "or pass --register (with --gpus N) to register it now"
                )
            org = plan.org or login.organization
            if not org:
                raise KitError(
                    "registering a site needs --org ORG (your organisation on the dashboard)"
                )
            progress(f"registering site {plan.site} ({plan.gpus or 0} GPU(s), organisation {org})")
            site_entry = dash.register_site(
                login, plan.site, org, plan.gpus or 0, plan.mem_per_gpu_gib
            )
            if int(site_entry.get("approval_state", 0)) < 100:
                raise KitError(
                    f"site {plan.site!r} is registered and waits for approval: ask the project admin to "
                    f"approve it at {dash.url}, then run this pull again (without --register)"
                )
        expected, label = plan.site, plan.store_as or plan.site
    elif plan.role == "server":
        expected = project.get("server1") or None
        label = plan.store_as or plan.site or expected
    else:
        expected, label = login.email, plan.store_as or plan.site or login.email
    if not label:
        raise KitError(
            f"cannot tell which name to store the {plan.role} kit under: pass --site NAME"
        )
    store.check_name("site", label)

    progress(
        f"downloading the {plan.role} kit{f' of site {plan.site}' if plan.role == 'client' else ''}"
    )
    pin = new_pin()
    data = dash.download(login, plan.role, pin, site=site_entry)
    staging = store.staging_dir()
    try:
        kit_root = unpack_kit(data, staging / "kit", pin, label=f"{plan.role} kit")
        del data, pin
        progress("checking the kit")
        return _install_checked(
            kit_root, label, expected, dash.url, plan.repin, f"the {plan.role} kit from {dash.url}"
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_kit(
    source: str, site: str, expected_name: Optional[str] = None, repin: bool = False
) -> PullResult:
    """Install a kit handed over as a directory (e.g. from `nvflare provision`), after the same checks."""
    src = Path(source)
    if not (src / "startup").is_dir():
        raise NotFound(f"{source}: no startup/ folder - not an unpacked NVFlare startup kit")
    store.check_name("site", site)
    staging = store.staging_dir()
    try:
        kit_root = staging / "kit"
        shutil.copytree(src, kit_root, symlinks=True)
        return _install_checked(kit_root, site, expected_name, None, repin, f"the kit in {source}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_with_pin(
    path: str, expected_name: Optional[str] = None, use_pin: bool = True
) -> Tuple[KitReport, bool]:
    """`hpcfed kit verify`: all checks, the pin looked up by the kit's own federation name."""
    report = verify_kit(path, expected_name=expected_name)
    pinned = False
    if use_pin and report.facts is not None:
        pin = store.get_pin(report.facts.federation)
        if pin is not None:
            pinned = True
            report = verify_kit(
                path,
                expected_name=expected_name,
                pinned_fingerprint=pin["fingerprint"],
                signed_folders=pin.get("signed_folders") or (),
            )
        else:
            report.warnings.append(
                f"no root CA pinned for federation {report.facts.federation if report.facts else '?'!r} "
                "yet (pinned at the first pull)"
            )
    return report, pinned
