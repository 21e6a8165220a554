"""A Fed-BioMed federation on the local test cluster, driven only through `hpcfed` commands
(`python -m demo fedbiomed`, what `make demo FRAMEWORK=fedbiomed` runs; the e2e test drives the
same).

Who does what, as on real sites (all through a wireguard-go hub in a network namespace):
- the researcher (`hpcuser` here) makes its component (`hpcfed kit fedbiomed create researcher`)
  and submits its experiment script as the researcher job (`--input experiment=FILE`); the job
  ends when the script ends;
- the sites make their node components and submit node jobs with their dataset descriptions
  (`--input dataset=DESC.json`): hospital-a on node2, and hospital-b with two nodes on node3
  (two components, two datasets, one compute node: the seed scenario).
Nodes dial the researcher only through the hub. The image (~3.5 GB, torch) is built once
(HPCFED_DEMO_FEDBIOMED_SIF: one built elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from demo.common import DemoUser, SavedState, cluster_up, hub_up
from demo.federation import BASE_SIF, IMAGE_DIR, USER, DemoError, say, sh
from demo.flower import ACTIVE
from demo.hubnet import HPCFED, HubNet

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("HPCFED_FEDBIOMED_DEMO_DIR", "/var/tmp/hpcfed-demo-fedbiomed"))
VERSION = os.environ.get("HPCFED_DEMO_FEDBIOMED", "6.4.1")
FEDERATION = "demo"
SERVER_NAME = "fl-server"
PORT = 50051
# node deployment -> (site profile, compute node, the rows of its CSV)
NODES = {
    "hospital-a": ("hospital-a", "node2", [(1, 10), (2, 20), (3, 30)]),
    "hospital-b": ("hospital-b", "node3", [(4, 40), (5, 50)]),
    "hospital-b2": ("hospital-b", "node3", [(6, 60)]),
}
TAG = "hpcfed-demo"
EXPERIMENT = REPO / "demo" / "fedbiomed" / "experiment.py"


def expected_mean() -> dict:
    rows = [r for _, _, site_rows in NODES.values() for r in site_rows]
    return {"x": sum(x for x, _ in rows) / len(rows), "y": sum(y for _, y in rows) / len(rows)}


DEMO = DemoUser("hpcfed-demo-fedbiomed")


def as_user_file(path: Path, text: str) -> None:
    path.write_text(text)
    shutil.chown(path, USER, USER)


@dataclass
class State(SavedState):
    state_dir: ClassVar[Path] = STATE_DIR
    deployments: list = field(default_factory=list)
    image: str = ""
    tunnel_ips: dict = field(default_factory=dict)
    public_keys: dict = field(default_factory=dict)
    kits: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)


class FedBiomedFederation:
    def __init__(self, state: Optional[State] = None):
        self.state = state or State.load()
        self.hub = HubNet(
            ns="hpcfed-fbm-hub",
            veth="vhffbm",
            iface="wgfbmdemo",
            subnet="10.196.11",
            state_dir=str(STATE_DIR / "hub"),
        )

    @property
    def userdir(self) -> Path:
        return DEMO.root

    def mark(self, event: str) -> None:
        self.state.timeline[event] = time.time()
        self.state.save()

    # ---------------------------------------------------------------- machines
    def cluster_up(self) -> None:
        cluster_up()
        DEMO.make_dirs(self.userdir / "data")

    def hub_up(self) -> None:
        hub_up(self.hub)

    def site_profiles(self) -> None:
        profiles = {
            "fbm-local": (
                "extends: local\ndescription: the local test cluster, Fed-BioMed demo directories\n"
                f"workdir: {self.userdir}/work\nhpcfed_command: {HPCFED[0]}\n"
                "time:\n  default: 30m\n"
            )
        }
        for profile, node, _ in NODES.values():
            profiles[profile] = (
                f"extends: fbm-local\ndescription: Fed-BioMed demo site {profile}\n"
                f'partitions:\n  default: low\nextra_directives: ["--nodelist={node}"]\n'
            )
        DEMO.write_profiles(profiles)

    def image(self) -> str:
        given = os.environ.get("HPCFED_DEMO_FEDBIOMED_SIF")
        if given:
            self.state.image = given
        else:
            sh(["install", "-d", "-o", USER, "-g", USER, "-m", "0755", str(IMAGE_DIR)])
            listed = DEMO.hpcfed_json("image", "list", "--image-dir", str(IMAGE_DIR))["images"]
            have = [
                i
                for i in listed
                if i.get("framework") == "fedbiomed" and i.get("framework_version") == VERSION
            ]
            if have:
                self.state.image = have[0]["path"]
            else:
                say(f"building the Fed-BioMed {VERSION} image (~3.5 GB; 15-65 min here)")
                out = DEMO.hpcfed_json(
                    "image", "build", "node", "--framework", "fedbiomed", "--version", VERSION,
                    "--base", f"localimage:{BASE_SIF}", "--image-dir", str(IMAGE_DIR),
                    "--compression", "zstd", timeout=5400,
                )  # fmt: skip
                self.state.image = out.get("path") or out.get("output")
        say(f"image: {self.state.image}")
        self.state.save()
        return self.state.image

    # ---------------------------------------------------------------- components, keys, data
    def components(self) -> None:
        made = DEMO.hpcfed_json(
            "kit", "fedbiomed", "create", "researcher", "--federation", FEDERATION,
            "--site", "fbm-local", "--server", f"{SERVER_NAME}:{PORT}",
            "--image", self.state.image,
        )  # fmt: skip
        say(f"researcher: component {made['path']}")
        for name in NODES:
            made = DEMO.hpcfed_json(
                "kit", "fedbiomed", "create", "node", "--federation", FEDERATION,
                "--site", name, "--server", f"{SERVER_NAME}:{PORT}",
                "--image", self.state.image,
            )  # fmt: skip
            self.state.kits[name] = made["path"]
            say(f"site {name}: node component {made['path']}")
        self.state.save()

    def datasets(self) -> None:
        data = self.userdir / "data"
        for name, (_, _, rows) in NODES.items():
            csv = data / f"{name}.csv"
            as_user_file(csv, "x,y\n" + "".join(f"{x},{y}\n" for x, y in rows))
            desc = {"path": str(csv), "data_type": "csv", "tags": TAG,
                    "description": f"{name} demo rows", "name": f"{name}-rows"}  # fmt: skip
            as_user_file(data / f"{name}.json", json.dumps(desc))

    def experiment(self, secagg: bool) -> Path:
        """The researcher's script: the shipped one with this federation's settings."""
        path = self.userdir / "data" / f"experiment{'-secagg' if secagg else ''}.py"
        settings = {"FBM_TAG": TAG, "FBM_EXPECTED_NODES": str(len(NODES))}
        settings["FBM_SECAGG"] = "1" if secagg else "0"
        head = "import os\n" + "".join(
            f"os.environ.setdefault({k!r}, {v!r})\n" for k, v in settings.items()
        )
        as_user_file(path, head + EXPERIMENT.read_text())
        return path

    def tunnel_keys(self) -> None:
        peers = [("server", SERVER_NAME)] + [("client", n) for n in NODES]
        for type_, peer in peers:
            ip, pub = DEMO.make_peer(self.hub, type_, peer)
            self.state.tunnel_ips[peer], self.state.public_keys[peer] = ip, pub
        self.state.save()

    # ---------------------------------------------------------------- jobs
    def submit_node(self, name: str) -> str:
        profile, _, _ = NODES[name]
        deployment = f"fbm-{name}"
        say(f"site {name}: hpcfed submit node --site {profile} (its dataset, 1 GPU)")
        DEMO.hpcfed(
            "submit", "node", "--site", profile, "--name", deployment, "--gpus", "1",
            "--image", self.state.image, "--kit", self.state.kits[name],
            "--tunnel-config", str(self.userdir / f"{name}.wg.conf"),
            "--server-ip", self.state.tunnel_ips[SERVER_NAME],
            "--input", f"dataset={self.userdir / 'data' / f'{name}.json'}",
        )  # fmt: skip
        self.state.deployments.append(deployment)
        self.state.save()
        return deployment

    def submit_researcher(self, secagg: bool = False) -> str:
        deployment = "fbm-researcher-secagg" if secagg else "fbm-researcher"
        say(
            f"researcher: hpcfed submit researcher (its experiment{', secure aggregation' * secagg})"
        )
        self.mark("submit_researcher")
        DEMO.hpcfed(
            "submit", "researcher", "--site", "fbm-local", "--name", deployment, "--gpus", "0",
            "--image", self.state.image,
            "--tunnel-config", str(self.userdir / f"{SERVER_NAME}.wg.conf"),
            "--input", f"experiment={self.experiment(secagg)}",
        )  # fmt: skip
        self.state.deployments.append(deployment)
        self.state.save()
        return deployment

    def status(self, *names) -> dict:
        return {d["name"]: d for d in DEMO.hpcfed_json("status", *names)["deployments"]}

    def wait_state(self, names, states, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.status(*names)
            if all(status[n].get("job_state") in states for n in names):
                return status
            time.sleep(2)
        raise DemoError(f"not {'/'.join(states)} within {timeout:.0f} s: {status}")

    def log(self, name: str) -> str:
        return DEMO.hpcfed("logs", name, check=False).stdout

    def result(self, researcher: str, timeout: float = 900) -> dict:
        """The researcher's FEDERATED-MEAN line, once its job has ended."""
        self.wait_state([researcher], ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout)
        self.mark("experiment_done")
        log = self.log(researcher)
        lines = [x for x in log.splitlines() if x.startswith("FEDERATED-MEAN ")]
        if not lines:
            raise DemoError(f"{researcher}: no FEDERATED-MEAN line; log ends: {log[-3000:]}")
        return json.loads(lines[-1].split(" ", 1)[1])

    def hub_traffic(self) -> dict:
        dump = sh(["ip", "netns", "exec", self.hub.ns, "wg", "show", self.hub.iface, "dump"]).stdout
        by_key = {}
        for line in dump.splitlines()[1:]:
            cols = line.split("\t")
            by_key[cols[0]] = {"rx_bytes": int(cols[5]), "tx_bytes": int(cols[6])}
        return {peer: by_key.get(key, {}) for peer, key in self.state.public_keys.items()}

    # ---------------------------------------------------------------- the whole sequence
    def prepare(self) -> None:
        self.cluster_up()
        self.hub_up()
        self.site_profiles()
        self.image()
        self.components()
        self.datasets()
        self.tunnel_keys()

    def launch_nodes(self) -> list:
        names = [self.submit_node(n) for n in NODES]
        self.wait_state(names, ("RUNNING",), 300)
        return names

    def down(self) -> None:
        for name in self.state.deployments:
            DEMO.hpcfed("cancel", name, check=False)
        deadline = time.monotonic() + 90
        while self.state.deployments and time.monotonic() < deadline:
            proc = DEMO.hpcfed("status", *self.state.deployments, "--json", check=False)
            try:
                rows = json.loads(proc.stdout)["deployments"]
            except (ValueError, KeyError):
                break
            if not any(r.get("job_state") in ACTIVE for r in rows):
                break
            time.sleep(2)
        self.hub.destroy()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree(DEMO.root, ignore_errors=True)
        say("Fed-BioMed demo cleaned up (the test cluster stays up)")


def up() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it starts the test cluster and a hub)", file=sys.stderr)
        return 7
    if STATE_DIR.exists() or DEMO.root.exists():
        FedBiomedFederation().down()
    fed = FedBiomedFederation(State())
    t0 = time.monotonic()
    fed.prepare()
    fed.launch_nodes()
    mean = fed.result(fed.submit_researcher())
    t = fed.state.timeline
    print("=" * 72)
    print(f"federated mean over {len(NODES)} nodes: {mean}")
    print(f"expected (pooled over every row):  {expected_mean()}")
    print(f"researcher submit -> result: {t['experiment_done'] - t['submit_researcher']:.0f} s")
    print("clean up (as root): make demo-down FRAMEWORK=fedbiomed")
    print("=" * 72)
    say(f"demo took {time.monotonic() - t0:.0f} s")
    return 0 if mean == expected_mean() else 1


def main(argv) -> int:
    try:
        if argv[:1] == ["down"]:
            FedBiomedFederation().down()
            return 0
        return up()
    except (DemoError, RuntimeError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
