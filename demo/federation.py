"""A whole NVFlare federation on the local test cluster, driven only through `hpcfed` commands.

Who does what, as on real sites:
- root plays the operators: the test cluster, the hub (in a network namespace: the "machine with
  a public address"), and the federation's central NVFlare dashboard (on loopback);
- the non-root researcher `hpcuser` does everything else with `hpcfed`: builds the images,
  pulls the kits, creates tunnel keys, submits the server and two client roles (sites
  `hospital-a` and `hospital-b`, each asking for a GPU), and submits the training job through
  the admin kit — from inside the image, reaching the server only through its own tunnel.

`python -m demo` (what `make demo` runs) does it all and prints a summary; `python -m demo down`
cleans up. The e2e test drives the same steps (tests/test_e2e_federation.py).
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from demo.hubnet import HubNet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the real-dashboard driver the kit tests use too

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
STATE_DIR = Path(os.environ.get("HPCFED_DEMO_DIR", "/var/tmp/hpcfed-demo"))
# Built images are a cache every run may reuse (like the offline base image beside it).
IMAGE_DIR = Path(os.environ.get("HPCFED_DEMO_IMAGES", "/var/cache/hpcfed/demo-images"))
USER = "hpcuser"
NVFLARE_VERSION = os.environ.get("HPCFED_DEMO_NVFLARE", "2.9.0")
BASE_SIF = os.environ.get("HPCFED_BASE_SIF", "/var/cache/hpcfed/base-bookworm.sif")
SERVER_NAME = "fl-server"
FL_PORT = 18002
CLIENT_SITES = {"hospital-a": "alice@hospital-a.test", "hospital-b": "bob@hospital-b.test"}
ADMIN_EMAIL = "admin@fed.test"


ROUND_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Round (\d+) (started|finished)\.")


def nvflare_time(stamp: str) -> float:
    """Epoch seconds of an NVFlare log time stamp (local time, like the host's)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_times(log: str) -> dict:
    """round -> (started, finished) epoch seconds, from an NVFlare server log."""
    rounds: dict = {}
    for line in log.splitlines():
        m = ROUND_RE.match(line)
        if m:
            rounds.setdefault(int(m.group(2)), {})[m.group(3)] = nvflare_time(m.group(1))
    return {r: (v["started"], v["finished"]) for r, v in rounds.items() if len(v) == 2}


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class DemoError(RuntimeError):
    pass


def sh(
    argv,
    *,
    user: Optional[str] = None,
    env: Optional[dict] = None,
    timeout: float = 600,
    check: bool = True,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if user:
        pw = pwd.getpwnam(user)
        full_env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        full_env.update(user_env(user))
        argv = ["runuser", "-u", user, "--"] + list(argv)
    full_env.update(env or {})
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or "/tmp"
    )
    if check and proc.returncode != 0:
        raise DemoError(
            f"{' '.join(map(str, argv[-6:]))} failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-1500:]}"
        )
    return proc


def demo_root(user: str = USER) -> Path:
    """Everything the demo's researcher has: its own XDG config/data/state/cache and the roles'
    work directories. `down` removes it, so no run sees what an earlier one left."""
    return Path(pwd.getpwnam(user).pw_dir) / "hpcfed-demo"


def user_env(user: str = USER) -> dict:
    root = demo_root(user) / "xdg"
    return {
        f"XDG_{kind.upper()}_HOME": str(root / kind)
        for kind in ("config", "data", "state", "cache")
    }


def hpcfed(*args, user: Optional[str] = USER, **kw) -> subprocess.CompletedProcess:
    return sh(HPCFED + list(args), user=user, **kw)


def hpcfed_json(*args, **kw):
    return json.loads(hpcfed(*args, "--json", **kw).stdout)


@dataclass
class State:
    """What the demo started, so `down` can undo it (kept in STATE_DIR/state.json)."""

    dashboard_pid: int = 0
    dashboard_url: str = ""
    dashboard_root: str = ""
    deployments: list = field(default_factory=list)
    admin_tunnel_pid: int = 0
    images: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)
    public_keys: dict = field(default_factory=dict)

    @classmethod
    def load(cls) -> State:
        try:
            return cls(**json.loads((STATE_DIR / "state.json").read_text()))
        except FileNotFoundError:
            return cls()

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = STATE_DIR / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, STATE_DIR / "state.json")


class Federation:
    def __init__(self, state: Optional[State] = None):
        self.state = state or State.load()
        self.hub = HubNet(state_dir=str(STATE_DIR / "hub"))
        self.home = Path(pwd.getpwnam(USER).pw_dir) if _user_exists(USER) else Path("/home") / USER
        self.userdir = self.home / "hpcfed-demo"  # demo_root() once the user exists
        self.dash = None
        self.passwords: dict = {}
        self.tunnel_ips: dict = {}

    def mark(self, event: str) -> None:
        self.state.timeline[event] = time.time()
        self.state.save()

    # ------------------------------------------------------------------ operators (root)
    def cluster_up(self) -> None:
        say("starting the local Slurm test cluster (hpcfed testcluster up)")
        sh(HPCFED + ["testcluster", "up"], timeout=900)
        os.environ["SLURM_CONF"] = "/var/lib/hpcfed/testcluster/etc/slurm.conf"
        self.home = Path(pwd.getpwnam(USER).pw_dir)
        self.userdir = demo_root()
        sh(["mkdir", "-p", str(self.userdir), *user_env().values()], user=USER)

    def hub_up(self) -> None:
        say(
            f"starting the WireGuard hub (wireguard-go in netns {self.hub.ns}, {self.hub.endpoint})"
        )
        self.hub.create()
        self.hub.hub(
            "init",
            "--endpoint",
            self.hub.endpoint,
            "--interface",
            self.hub.iface,
            "--keepalive",
            "5",
        )
        self.hub.hub("up", "--userspace")

    def dashboard_up(self) -> None:
        from nvflare_dashboard import start_dashboard

        say("starting the federation's NVFlare dashboard on loopback")
        dash = start_dashboard()
        dash.setup_project("hpcfeddemo", server=SERVER_NAME, fl_port=FL_PORT)
        for site, email in CLIENT_SITES.items():
            dash.add_user(email, org=site.replace("-", "_"))  # NVFlare org names: [A-Za-z0-9_]+
            dash.add_site(email, site, gpus=1)
        dash.freeze()
        self.dash = dash
        self.state.dashboard_pid = dash.proc.pid
        self.state.dashboard_url = dash.url
        self.state.dashboard_root = dash.web_root
        self.passwords = dict(dash.users, **{ADMIN_EMAIL: dash.admin_password})
        self.state.save()

    # ------------------------------------------------------------------ the researcher
    def site_profiles(self) -> None:
        sites = Path(user_env()["XDG_CONFIG_HOME"]) / "hpcfed" / "sites"
        sh(["mkdir", "-p", str(sites)], user=USER)
        profiles = {
            # The test cluster, with the roles' work directories inside the demo's own folder.
            "demo-local": (
                "extends: local\ndescription: the local test cluster, demo work directories\n"
                f"workdir: {self.userdir}/work\n"
            )
        }
        for i, site in enumerate(CLIENT_SITES, start=2):
            # Both hospitals are the test cluster; each client gets a node of its own (as if at
            # its own site) in the partition where it may be preempted.
            profiles[site] = (
                f"extends: demo-local\ndescription: demo site {site} (the local test cluster)\n"
                "partitions:\n  default: low\n"
                f'extra_directives: ["--nodelist=node{i}"]\n'
            )
        for site, text in profiles.items():
            subprocess.run(
                ["runuser", "-u", USER, "--", "tee", str(sites / f"{site}.yaml")],
                input=text,
                capture_output=True,
                text=True,
                check=True,
            )

    def images(self) -> dict:
        images = {}
        sh(["install", "-d", "-o", USER, "-g", USER, "-m", "0755", str(IMAGE_DIR)])
        listed = {
            i.get("role"): i
            for i in hpcfed_json("image", "list", "--image-dir", str(IMAGE_DIR))["images"]
        }
        for role in ("server", "client"):
            have = listed.get(role)
            if have and have.get("framework_version", have.get("version")) == NVFLARE_VERSION:
                images[role] = have["path"]
                say(f"reusing the {role} image {have['path']}")
                continue
            say(
                f"building the NVFlare {NVFLARE_VERSION} {role} image as {USER} "
                f"(hpcfed image build, offline base {BASE_SIF})"
            )
            t0 = time.monotonic()
            out = hpcfed_json(
                "image",
                "build",
                role,
                "--framework",
                "nvflare",
                "--version",
                NVFLARE_VERSION,
                "--base",
                f"localimage:{BASE_SIF}",
                "--image-dir",
                str(IMAGE_DIR),
                "--compression",
                "zstd",
                timeout=1800,
            )
            images[role] = out.get("path") or out.get("output")
            say(f"  built {images[role]} in {time.monotonic() - t0:.0f} s")
        self.state.images = images
        self.state.save()
        return images

    def kits(self) -> None:
        url = self.state.dashboard_url
        pulls = [("server", SERVER_NAME, ADMIN_EMAIL, ["--as", "demo-local"])]
        pulls += [("client", site, email, []) for site, email in CLIENT_SITES.items()]
        pulls += [("admin", ADMIN_EMAIL, ADMIN_EMAIL, [])]
        for role, site, email, extra in pulls:
            say(f"pulling the {role} kit for {site} from the dashboard (hpcfed kit pull)")
            # --repin: every demo run creates its federation anew (a new root CA); a real user
            # re-pins only when the project admin confirms the CA changed.
            hpcfed(
                "kit",
                "pull",
                "--insecure-http",
                "--dashboard",
                url,
                "--user",
                email,
                "--role",
                role,
                "--site",
                site,
                "--repin",
                *extra,
                env={"HPCFED_DASHBOARD_PASSWORD": self.passwords[email]},
            )

    def tunnel_keys(self) -> None:
        """genconf on the hub, the key pair made where it is used, the public key back to the hub."""
        peers = (
            [("server", SERVER_NAME)]
            + [("client", s) for s in CLIENT_SITES]
            + [("client", "admin")]
        )
        for type_, peer in peers:
            info = json.loads(self.hub.hub("genconf", type_, peer, "--json").stdout)
            conf = self.userdir / f"{peer}.wg.conf"
            shutil.copy(info["config"], conf)
            shutil.chown(conf, USER, USER)
            os.chmod(conf, 0o600)
            pub = hpcfed_json("vpn", "keygen", "--config", str(conf), "--force")["public_key"]
            self.hub.hub("add", type_, peer, pub)
            self.state.public_keys[peer] = pub
            self.tunnel_ips[peer] = info["address"].split("/")[0]
            say(
                f"tunnel peer {peer}: {self.tunnel_ips[peer]} (key made by {USER}, only the public key sent)"
            )

    def submit_roles(self) -> None:
        server_ip = self.tunnel_ips[SERVER_NAME]
        say("submitting the server role (hpcfed submit server --site demo-local)")
        self.mark("submit")
        hpcfed(
            "submit",
            "server",
            "--site",
            "demo-local",
            "--name",
            "demo-server",
            "--gpus",
            "0",
            "--image",
            self.state.images["server"],
            "--tunnel-config",
            str(self.userdir / f"{SERVER_NAME}.wg.conf"),
            # The server listens on another local port: the clients' forwards of the kit's
            # port share this one host with it (on real sites they are on other clusters).
            "-R",
            f"{FL_PORT}=127.0.0.1:{FL_PORT + 10000}",
        )
        self.state.deployments.append("demo-server")
        for site in CLIENT_SITES:
            say(
                f"submitting the client role of {site} with 1 GPU (hpcfed submit client --site {site})"
            )
            hpcfed(
                "submit",
                "client",
                "--site",
                site,
                "--name",
                f"demo-{site}",
                "--gpus",
                "1",
                "--image",
                self.state.images["client"],
                "--tunnel-config",
                str(self.userdir / f"{site}.wg.conf"),
                # The forward follows from the client's port: it listens on the deployment's
                # own loopback address (two clients on this one host do not collide).
                "--server-ip",
                server_ip,
            )
            self.state.deployments.append(f"demo-{site}")
        self.state.save()

    def wait_running(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = {
                d["name"]: d for d in hpcfed_json("status", *self.state.deployments)["deployments"]
            }
            states = {n: d.get("job_state") for n, d in status.items()}
            if all(s == "RUNNING" for s in states.values()):
                say(
                    "all roles running: "
                    + ", ".join(
                        f"{n} on {status[n].get('node') or status[n].get('nodes') or '?'}"
                        for n in states
                    )
                )
                return status
            time.sleep(2)
        raise DemoError(f"roles not running after {timeout:.0f} s: {states}")

    def run_training(
        self,
        timeout: float = 900,
        job_src: Path = REPO / "demo" / "jobs" / "hello-numpy",
        on_event=None,
    ) -> dict:
        """Submit the NVFlare job with the admin kit from inside the image, through a tunnel."""
        server_ip = self.tunnel_ips[SERVER_NAME]
        bind = "127.0.20.1"
        admin_conf = self.userdir / "admin.wg.conf"
        ready = self.userdir / "admin.ready"
        say("admin console: own tunnel peer, /etc/hosts maps the server name to its forward")
        tun = subprocess.Popen(
            ["runuser", "-u", USER, "--"]
            + HPCFED
            + [
                "tunnel",
                "up",
                "--config",
                str(admin_conf),
                "--ready-file",
                str(ready),
                "-L",
                f"{bind}:{FL_PORT}={server_ip}:{FL_PORT}",
            ],
            stdout=open(self.userdir / "admin-tunnel.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, HOME=str(self.home), **user_env()),
        )
        self.state.admin_tunnel_pid = tun.pid
        self.state.save()
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if tun.poll() is not None or time.monotonic() > deadline:
                    raise DemoError(
                        f"admin tunnel did not come up: "
                        f"{(self.userdir / 'admin-tunnel.log').read_text()[-800:]}"
                    )
                time.sleep(0.3)
            hosts = self.userdir / "admin.hosts"
            hosts.write_text(f"127.0.0.1 localhost\n{bind} {SERVER_NAME}\n")
            admin_kit = hpcfed_json("kit", "show", ADMIN_EMAIL, "--role", "admin")["path"]
            job_dir = self.userdir / "jobs"
            if job_dir.exists():
                shutil.rmtree(job_dir)
            shutil.copytree(job_src, job_dir / "job")
            shutil.copy(REPO / "demo" / "admin_job.py", self.userdir / "admin_job.py")
            sh(["chown", "-R", f"{USER}:{USER}", str(self.userdir)])
            say(f"submitting the training job ({job_src.name}) through the admin kit")
            argv = [
                "apptainer",
                "exec",
                "--cleanenv",
                "--containall",
                "--bind",
                f"{hosts}:/etc/hosts:ro",
                "--bind",
                f"{admin_kit}:/fl/admin:ro",
                "--bind",
                f"{self.userdir}:/fl/demo",
                self.state.images["client"],
                "python3",
                "/fl/demo/admin_job.py",
                ADMIN_EMAIL,
                "/fl/admin",
                "/fl/demo/jobs/job",
                str(timeout),
            ]
            proc = subprocess.Popen(
                ["runuser", "-u", USER, "--"] + argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd="/tmp",
            )
            result = {}
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if on_event is not None:
                    on_event(ev)
                if ev["event"] == "clients":
                    say(f"  server sees clients: {', '.join(ev['clients']) or '(none yet)'}")
                elif ev["event"] == "submitted":
                    self.mark("training_submitted")
                    say(f"  job {ev['job_id']} submitted")
                elif ev["event"] == "status":
                    say(f"  job status: {ev['status']}")
                    if ev["status"] == "RUNNING":
                        self.mark("training_running")
                elif ev["event"] == "done":
                    result = ev
            proc.wait(timeout=60)
            if not result:
                raise DemoError(f"admin session failed: {proc.stderr.read()[-1500:]}")
            self.mark("training_done")
            return result
        finally:
            os.killpg(tun.pid, signal.SIGTERM) if tun.poll() is None else None

    def hub_traffic(self) -> dict:
        """Bytes each peer exchanged through the hub, from the hub's own WireGuard (`wg show`)."""
        dump = sh(["ip", "netns", "exec", self.hub.ns, "wg", "show", self.hub.iface, "dump"]).stdout
        by_key = {}
        for line in dump.splitlines()[1:]:
            cols = line.split("\t")
            by_key[cols[0]] = {
                "rx_bytes": int(cols[5]),
                "tx_bytes": int(cols[6]),
                "latest_handshake": int(cols[4]),
            }
        return {peer: by_key.get(key, {}) for peer, key in self.state.public_keys.items()}

    def summary(self, result: dict) -> str:
        status = {
            d["name"]: d for d in hpcfed_json("status", *self.state.deployments)["deployments"]
        }
        t = self.state.timeline
        lines = [
            "",
            "=" * 72,
            f"federation result: {result.get('status')} (job {result.get('job_id')})",
            "-" * 72,
        ]
        for name, d in status.items():
            lines.append(
                f"{name:18} job {d.get('job_id', '?'):>6}  {d.get('job_state', '?'):10} "
                f"node {d.get('node') or d.get('nodes') or '?'}"
            )
        lines.append("-" * 72)
        for peer, traffic in self.hub_traffic().items():
            lines.append(
                f"tunnel {peer:12} via hub: {traffic.get('rx_bytes', 0) / 1e3:9.1f} kB in, "
                f"{traffic.get('tx_bytes', 0) / 1e3:9.1f} kB out"
            )
        if "submit" in t and "training_done" in t:
            lines.append(f"submit → training finished: {t['training_done'] - t['submit']:.0f} s")
        lines += [
            "",
            "see it yourself (as hpcuser):  hpcfed status; hpcfed logs demo-server",
            "clean up (as root):           make demo-down",
            "=" * 72,
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ the whole sequence
    def prepare(self) -> None:
        """Everything before the roles are submitted: operators' parts, images, kits, keys."""
        self.cluster_up()
        self.hub_up()
        self.dashboard_up()
        self.site_profiles()
        self.images()
        self.kits()
        self.tunnel_keys()

    def launch(self) -> dict:
        """Submit the server and the clients and wait until all run."""
        self.submit_roles()
        return self.wait_running()

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        for name in self.state.deployments:
            hpcfed("cancel", name, check=False)
        for pid in (self.state.admin_tunnel_pid, self.state.dashboard_pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.state.dashboard_root:
            shutil.rmtree(self.state.dashboard_root, ignore_errors=True)
        self.hub.destroy()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        if _user_exists(USER):
            shutil.rmtree(demo_root(), ignore_errors=True)
        say("demo cleaned up (the test cluster stays up: hpcfed testcluster down stops it)")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def up() -> int:
    if os.geteuid() != 0:
        print(
            "demo: run as root (it starts the test cluster, a hub and a dashboard)", file=sys.stderr
        )
        return 7
    if STATE_DIR.exists() or (_user_exists(USER) and demo_root().exists()):
        say("cleaning up a previous demo first")
        Federation().down()
    fed = Federation(State())
    t0 = time.monotonic()
    fed.prepare()
    fed.launch()
    result = fed.run_training()
    print(fed.summary(result))
    say(f"demo took {time.monotonic() - t0:.0f} s")
    return 0 if result.get("status") == "FINISHED:COMPLETED" else 1


def main(argv) -> int:
    try:
        if argv[:1] == ["down"]:
            Federation().down()
            return 0
        return up()
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the demo's own bug: one line, the state stays for `down`
        if os.environ.get("HPCFED_DEBUG"):
            raise
        print(f"demo: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 70
