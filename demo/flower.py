"""A whole Flower federation on the local test cluster, driven only through `hpcfed` commands
(`python -m demo flower`, what `make demo FRAMEWORK=flower` runs; the e2e test drives the same).

Who does what, as on real sites (all through a wireguard-go hub in a network namespace):
- the operator (`hpcuser` here) makes the federation's CA and server certificate
  (`hpcfed kit flower ca`), submits the SuperLink, registers the sites' public keys and runs the
  shipped numpy app with its own `flwr` console (`hpcfed kit flower register | list | flwr`),
  inside the superlink image, through its own tunnel peer;
- each site (`hospital-a`, `hospital-b`, a GPU each on its own node) makes its own key
  (`hpcfed kit flower keygen`: the private key never leaves it) and submits its SuperNode.
Nothing reaches the SuperLink except through the hub. State, hub namespace and work directories
are the Flower demo's own, so it can run beside the NVFlare demo.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from demo.common import DemoUser, SavedState, cluster_up, hub_up
from demo.federation import BASE_SIF, HPCFED, IMAGE_DIR, USER, DemoError, say, sh
from demo.hubnet import HubNet

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("HPCFED_FLOWER_DEMO_DIR", "/var/tmp/hpcfed-demo-flower"))
FLOWER_VERSION = os.environ.get("HPCFED_DEMO_FLOWER", "1.42.0")
FEDERATION = "demo"
SERVER_NAME = "fl-server"
PORT = 9093
SITES = ("hospital-a", "hospital-b")
# hospital-c shares hospital-b's node (two SuperNodes on one node); hospital-x's key is never
# registered. Both only in the e2e test.
EXTRA_SITES = ("hospital-c", "hospital-x")
NODES = {"hospital-a": "node2", "hospital-b": "node3", "hospital-c": "node3", "hospital-x": "node3"}
APP = REPO / "demo" / "flower_app"
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")
EXPECTED_ROUNDS = 3


DEMO = DemoUser("hpcfed-demo-flower")


def demo_root() -> Path:
    return DEMO.root


def user_env() -> dict:
    return DEMO.env()


def hpcfed(*args, check: bool = True, timeout: float = 600, env: Optional[dict] = None):
    return DEMO.hpcfed(*args, check=check, timeout=timeout, env=env)


def hpcfed_json(*args, **kw):
    return DEMO.hpcfed_json(*args, **kw)


@dataclass
class State(SavedState):
    state_dir: ClassVar[Path] = STATE_DIR
    deployments: list = field(default_factory=list)
    images: dict = field(default_factory=dict)
    tunnel_ips: dict = field(default_factory=dict)
    public_keys: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)


class FlowerFederation:
    def __init__(self, state: Optional[State] = None):
        self.state = state or State.load()
        self.hub = HubNet(
            ns="hpcfed-flower-hub",
            veth="vhfflwr",
            iface="wgflwrdemo",
            subnet="10.196.9",
            state_dir=str(STATE_DIR / "hub"),
        )

    @property
    def userdir(self) -> Path:
        return demo_root()

    def mark(self, event: str) -> None:
        self.state.timeline[event] = time.time()
        self.state.save()

    # ---------------------------------------------------------------- operators of the machines
    def cluster_up(self) -> None:
        cluster_up()
        DEMO.make_dirs()

    def hub_up(self) -> None:
        hub_up(self.hub)

    def site_profiles(self) -> None:
        profiles = {
            "flower-local": (
                "extends: local\ndescription: the local test cluster, Flower demo directories\n"
                f"workdir: {self.userdir}/work\n"
                # The jobs run the very hpcfed this demo runs.
                f"hpcfed_command: {HPCFED[0]}\n"
            )
        }
        for site, node in NODES.items():
            profiles[site] = (
                f"extends: flower-local\ndescription: Flower demo site {site}\n"
                f'partitions:\n  default: low\nextra_directives: ["--nodelist={node}"]\n'
            )
        DEMO.write_profiles(profiles)

    def images(self) -> dict:
        sh(["install", "-d", "-o", USER, "-g", USER, "-m", "0755", str(IMAGE_DIR)])
        listed = {
            (i.get("framework"), i.get("role")): i
            for i in hpcfed_json("image", "list", "--image-dir", str(IMAGE_DIR))["images"]
        }
        for role in ("superlink", "supernode"):
            have = listed.get(("flower", role))
            if have and have.get("framework_version") == FLOWER_VERSION:
                self.state.images[role] = have["path"]
                say(f"reusing the Flower {role} image {have['path']}")
                continue
            say(f"building the Flower {FLOWER_VERSION} {role} image (hpcfed image build)")
            t0 = time.monotonic()
            out = hpcfed_json(
                "image", "build", role, "--framework", "flower", "--version", FLOWER_VERSION,
                "--base", f"localimage:{BASE_SIF}", "--image-dir", str(IMAGE_DIR),
                "--compression", "zstd", timeout=1800,
            )  # fmt: skip
            self.state.images[role] = out.get("path") or out.get("output")
            say(f"  built {self.state.images[role]} in {time.monotonic() - t0:.0f} s")
        self.state.save()
        return self.state.images

    # ---------------------------------------------------------------- credentials and keys
    def credentials(self, sites=SITES + EXTRA_SITES) -> None:
        out = hpcfed_json(
            "kit", "flower", "ca", "--federation", FEDERATION, "--server-name", SERVER_NAME,
            "--port", str(PORT),
        )  # fmt: skip
        say(
            f"operator: CA and server certificate for {SERVER_NAME} ({out['ca_fingerprint'][:23]}...)"
        )
        for site in sites:
            made = hpcfed_json(
                "kit", "flower", "keygen", "--federation", FEDERATION, "--site", site,
                "--ca", out["ca"], "--server", f"{SERVER_NAME}:{PORT}",
            )  # fmt: skip
            self.state.public_keys[site] = made["public_key"]
            say(f"site {site}: its own SuperNode key, public key {made['public_key']}")
        self.state.save()

    def tunnel_keys(self) -> None:
        peers = [("server", SERVER_NAME)] + [("client", s) for s in SITES + EXTRA_SITES]
        peers.append(("client", "operator"))
        for type_, peer in peers:
            self.state.tunnel_ips[peer], _ = DEMO.make_peer(self.hub, type_, peer)
        self.state.save()

    # ---------------------------------------------------------------- jobs
    def submit_superlink(self) -> None:
        say("operator: hpcfed submit superlink (TLS, node authentication, state on disk)")
        self.mark("submit")
        hpcfed(
            "submit", "superlink", "--site", "flower-local", "--name", "flwr-superlink",
            "--gpus", "0", "--image", self.state.images["superlink"],
            "--tunnel-config", str(self.userdir / f"{SERVER_NAME}.wg.conf"),
            # Another local port: on this one test host the sites' forwards use the federation's.
            "-R", f"{PORT}=127.0.0.1:{PORT + 10000}",
        )  # fmt: skip
        self.state.deployments.append("flwr-superlink")
        self.state.save()

    def submit_supernode(self, site: str, bind_octet: int) -> str:
        server_ip = self.state.tunnel_ips[SERVER_NAME]
        name = f"flwr-{site}"
        say(f"site {site}: hpcfed submit supernode with 1 GPU")
        hpcfed(
            "submit", "supernode", "--site", site, "--name", name, "--gpus", "1",
            "--image", self.state.images["supernode"],
            "--tunnel-config", str(self.userdir / f"{site}.wg.conf"),
            "-L", f"127.0.{bind_octet}.1:{PORT}={server_ip}:{PORT}",
        )  # fmt: skip
        self.state.deployments.append(name)
        self.state.save()
        return name

    def wait_running(self, names, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        states: dict = {}
        while time.monotonic() < deadline:
            status = {d["name"]: d for d in hpcfed_json("status", *names)["deployments"]}
            states = {n: d.get("job_state") for n, d in status.items()}
            if all(s == "RUNNING" for s in states.values()):
                return status
            time.sleep(2)
        raise DemoError(f"roles not running after {timeout:.0f} s: {states}")

    # ---------------------------------------------------------------- the operator's console
    def console(self) -> list:
        return [
            "--federation", FEDERATION, "--image", self.state.images["superlink"],
            "--tunnel-config", str(self.userdir / "operator.wg.conf"),
            "--server-ip", self.state.tunnel_ips[SERVER_NAME],
        ]  # fmt: skip

    def register(self, site: str) -> int:
        out = hpcfed_json(
            "kit", "flower", "register", self.state.public_keys[site], "--site", site,
            *self.console(),
        )  # fmt: skip
        say(f"operator: registered {site} as node {out.get('node-id')}")
        return int(out["node-id"])

    def nodes(self) -> list:
        proc = hpcfed("kit", "flower", "list", *self.console(), "--json", check=False)
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout).get("nodes", [])

    def wait_superlink(self, timeout: float = 180) -> None:
        """The job runs before the SuperLink listens: ask until it answers through the hub."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if hpcfed("kit", "flower", "list", *self.console(), check=False).returncode == 0:
                say("operator: the SuperLink answers through the hub")
                return
            time.sleep(3)
        tail = hpcfed("logs", "flwr-superlink", check=False).stdout.strip().splitlines()[-15:]
        raise DemoError(
            f"the SuperLink did not answer within {timeout:.0f} s; its log ends:\n"
            + "\n".join(tail)
        )

    def wait_gone(self, names, timeout: float = 90) -> None:
        """Until the cancelled jobs have ended: a next run's SuperLink needs the port back."""
        deadline = time.monotonic() + timeout
        while names and time.monotonic() < deadline:
            proc = hpcfed("status", *names, "--json", check=False)
            try:
                rows = json.loads(proc.stdout)["deployments"]
            except (ValueError, KeyError):
                return
            active = [r["name"] for r in rows if r.get("job_state") in ACTIVE]
            if not active:
                return
            time.sleep(2)
        say(f"jobs still active after {timeout:.0f} s: {names}")

    def wait_online(self, node_ids, timeout: float = 240) -> list:
        deadline = time.monotonic() + timeout
        nodes: list = []
        while time.monotonic() < deadline:
            nodes = self.nodes()
            online = {int(n["node-id"]) for n in nodes if n.get("status") == "online"}
            if set(node_ids) <= online:
                return nodes
            time.sleep(3)
        raise DemoError(f"SuperNodes {node_ids} not online after {timeout:.0f} s: {nodes}")

    def run_app(self, rounds: int = EXPECTED_ROUNDS, round_seconds: float = 0.0, on_line=None):
        """`flwr run` of the shipped app, streamed; returns (result dict, run id, output)."""
        self.mark("run_submitted")
        argv = HPCFED + [
            "kit", "flower", "flwr", *self.console(), "--app", str(APP), "--",
            "run", "/fl/workspace/in/app", FEDERATION, "--stream",
            "--run-config", f"num-server-rounds={rounds} round-seconds={float(round_seconds)}",
        ]  # fmt: skip
        env = dict(os.environ, **user_env(), HOME=str(pwd.getpwnam(USER).pw_dir))
        proc = subprocess.Popen(
            ["runuser", "-u", USER, "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/tmp",
        )  # fmt: skip
        result, run_id, lines = {}, None, []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            if "[ROUND 1/" in line and "first_round" not in self.state.timeline:
                self.mark("first_round")
            if "Successfully started run" in line:
                run_id = line.rsplit(" ", 1)[-1].strip()
            if line.startswith("hpcfed-result: "):
                result = json.loads(line.split(": ", 1)[1])
        proc.wait(timeout=60)
        self.mark("run_done")
        return result, run_id, "".join(lines)

    def runs(self) -> list:
        proc = hpcfed(
            "kit", "flower", "flwr", *self.console(), "--", "ls", FEDERATION, "--format", "json",
            check=False,
        )  # fmt: skip
        start = proc.stdout.find("{")
        return json.loads(proc.stdout[start:]).get("runs", []) if start >= 0 else []

    # ---------------------------------------------------------------- the whole sequence
    def prepare(self) -> None:
        self.cluster_up()
        self.hub_up()
        self.site_profiles()
        self.images()
        self.credentials()
        self.tunnel_keys()

    def launch(self) -> dict:
        self.submit_superlink()
        self.wait_running(["flwr-superlink"])
        self.wait_superlink()
        ids = {site: self.register(site) for site in SITES}
        for i, site in enumerate(SITES, start=1):
            self.submit_supernode(site, 10 + i)
        self.wait_running([f"flwr-{s}" for s in SITES])
        self.wait_online(list(ids.values()))
        say("both SuperNodes online")
        return ids

    def down(self) -> None:
        for name in self.state.deployments:
            proc = hpcfed("cancel", name, check=False)
            if proc.returncode != 0:
                say(f"cancel {name} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        self.wait_gone(self.state.deployments)
        self.hub.destroy()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree(demo_root(), ignore_errors=True)
        say("Flower demo cleaned up (the test cluster stays up)")


def up() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it starts the test cluster and a hub)", file=sys.stderr)
        return 7
    if STATE_DIR.exists() or demo_root().exists():
        FlowerFederation().down()
    fed = FlowerFederation(State())
    t0 = time.monotonic()
    fed.prepare()
    fed.launch()
    result, run_id, _ = fed.run_app()
    t = fed.state.timeline
    print("=" * 72)
    print(f"Flower run {run_id}: {result}")
    print(f"expected: every weight {float(EXPECTED_ROUNDS)} after {EXPECTED_ROUNDS} rounds")
    if "first_round" in t:
        print(f"submit -> first round: {t['first_round'] - t['submit']:.0f} s")
    print("clean up (as root): python -m demo flower down")
    print("=" * 72)
    say(f"demo took {time.monotonic() - t0:.0f} s")
    ok = result.get("weights") == [float(EXPECTED_ROUNDS)] * 4
    return 0 if ok else 1


def main(argv) -> int:
    try:
        if argv[:1] == ["down"]:
            FlowerFederation().down()
            return 0
        return up()
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # the hub helper's one-line errors
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
