"""Fed-BioMed 6.4.1: its image, its components as kits, its inputs, and a federation of Slurm jobs.

Real parts: Apptainer 1.4, the Fed-BioMed image built by `hpcfed image build` from the offline
bookworm base (pip reaches PyPI at build time only), `fedbiomed component create` run by
`hpcfed kit fedbiomed create` as the non-root test user, and a researcher job and three node jobs
on the local Slurm test cluster meeting only through a wireguard-go hub (demo/fedbiomed.py; no
GPU is needed: analytics on CSVs, the GPUs are Slurm's gres).

The image is ~3.5 GB (torch is a hard dependency of Fed-BioMed, and PyPI's x86_64 torch is the
CUDA build), so it is built once per version of its definition file and reused: it lives in
/var/cache/hpcfed/fedbiomed-<hash of fedbiomed.def>/, and a changed definition builds anew
(~4 min here with zstd: pip ~3 min, mksquashfs ~1 min).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, need, run

from hpcfed.paths import apptainer_defs_dir

VERSION = "6.4.1"
BASE_SIF = os.environ.get("HPCFED_TEST_BASE_SIF", "/var/cache/hpcfed/base-bookworm.sif")
DEF_FILE = apptainer_defs_dir() / "fedbiomed.def"
IMAGE_CACHE = Path("/var/cache/hpcfed")
USER = "hpcuser"
SERVER = "fl-server"


# ---------------------------------------------------------------- the image (plan: pure)


@pytest.mark.parametrize("role", ["node", "researcher"])
def test_one_image_serves_both_roles(tmp_path, role):
    proc = hpcfed(
        "image", "build", role, "--framework", "fedbiomed", "--version", VERSION,
        "--base", f"localimage:{BASE_SIF}", "--image-dir", str(tmp_path), "--dry-run", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["output"] == str(tmp_path / f"fedbiomed-{VERSION}.sif")
    assert plan["definition"] == str(DEF_FILE)
    assert plan["build_args"]["FRAMEWORK_VERSION"] == VERSION
    assert not list(tmp_path.iterdir())  # a dry run builds nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["client", "--framework", "fedbiomed", "--version", VERSION],
            "a fedbiomed role (researcher, node)",
        ),
        (["node", "--framework", "nvflare", "--version", "2.9.0"], "a nvflare role"),
        (["node", "--framework", "fedbiomed", "--version", "6.4.1;rm"], "--version"),
    ],
)
def test_image_build_bad_role_or_version_is_one_line(tmp_path, args, message):
    proc = hpcfed("image", "build", *args, "--image-dir", str(tmp_path), "--dry-run")
    assert proc.returncode == 3, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the image (real build)


def _image_dir() -> Path:
    digest = hashlib.sha256(DEF_FILE.read_bytes()).hexdigest()[:12]
    return IMAGE_CACHE / f"fedbiomed-{digest}"


@pytest.fixture(scope="session")
def fedbiomed_image():
    """The Fed-BioMed SIF, built by `hpcfed image build` once per definition file, then reused."""
    need(shutil.which("apptainer") is not None, "apptainer is not installed")
    given = os.environ.get("HPCFED_TEST_FEDBIOMED_SIF")  # an image built by hand, e.g. elsewhere
    if given:
        return given
    need(os.path.isfile(BASE_SIF), f"offline base image {BASE_SIF} missing")
    image_dir = _image_dir()
    image = image_dir / f"fedbiomed-{VERSION}.sif"
    if not image.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        proc = hpcfed(
            "image", "build", "node", "--framework", "fedbiomed", "--version", VERSION,
            "--base", f"localimage:{BASE_SIF}", "--image-dir", str(image_dir), "--json",
            "--compression", "zstd", timeout=3600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "built " in proc.stderr and "m" in proc.stderr.splitlines()[-1]  # time printed
        print(proc.stderr.splitlines()[-1])
    os.chmod(image_dir, 0o755)
    os.chmod(image, 0o644)
    return str(image)


@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
def test_image_is_labelled_and_runs_fedbiomed_offline(fedbiomed_image, tmp_path):
    proc = hpcfed("image", "list", "--image-dir", os.path.dirname(fedbiomed_image), "--json")
    assert proc.returncode == 0, proc.stderr
    (record,) = [i for i in json.loads(proc.stdout)["images"] if i["path"] == fedbiomed_image]
    assert (record["framework"], record["framework_version"]) == ("fedbiomed", VERSION)
    assert record["role"] == "node+researcher"
    # --containall --cleanenv as in a job: no network needed, torch imports without a GPU.
    out = run(
        ["apptainer", "exec", "--containall", "--cleanenv", "--net", "--network", "none",
         fedbiomed_image, "python", "-c",
         "import torch, fedbiomed; print(fedbiomed.__version__, torch.cuda.is_available())"],
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [f"v{VERSION}", "False"]


# ---------------------------------------------------------------- components as kits


def _kit(user: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return hpcfed("kit", "fedbiomed", "create", *args, "--json", user=user, timeout=600, **kw)


def _modes(root: str) -> set:
    """Permission bits of everything under root (directories and files)."""
    out = set()
    for folder, _dirs, files in os.walk(root):
        out.add(("d", stat.S_IMODE(os.stat(folder).st_mode)))
        for name in files:
            out.add(("f", stat.S_IMODE(os.lstat(os.path.join(folder, name)).st_mode)))
    return out


@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
def test_kit_creates_private_components_for_the_server_name(fedbiomed_image):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    fed = f"fbm-{uuid.uuid4().hex[:6]}"
    made = {}
    for role, site in (("researcher", "hub"), ("node", "hospital-a")):
        proc = _kit(
            USER, role, "--federation", fed, "--site", site, "--server", SERVER,
            "--image", fedbiomed_image,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        made[role] = json.loads(proc.stdout)
        assert (made[role]["role"], made[role]["site"]) == (role, site)
        assert (made[role]["server_host"], made[role]["server_port"]) == (SERVER, 50051)
    root = Path(made["researcher"]["path"])
    cert = x509.load_pem_x509_certificate(next((root / "etc" / "certs").glob("*.pem")).read_bytes())
    # Nodes dial exactly this name: the researcher's certificate carries it as CN.
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [SERVER]
    assert made["researcher"]["name"] == SERVER
    for kit in made.values():
        assert os.stat(kit["path"]).st_uid == pwd.getpwnam(USER).pw_uid
        assert _modes(kit["path"]) <= {("d", 0o700), ("f", 0o600)}, _modes(kit["path"])
    shown = hpcfed("kit", "show", "hospital-a", "--role", "node", "--json", user=USER)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["path"] == made["node"]["path"]


@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
@pytest.mark.parametrize(
    "server, message",
    [("fl_server", "is not a host name"), ("fl-server:99999", "outside 1-65535")],
)
def test_kit_bad_server_is_one_line_and_installs_nothing(fedbiomed_image, server, message):
    proc = _kit(
        USER, "node", "--federation", "f", "--site", "s", "--server", server,
        "--image", fedbiomed_image,
    )  # fmt: skip
    assert proc.returncode == 3 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    listed = hpcfed("kit", "list", "--json", user=USER)
    assert json.loads(listed.stdout) == []


# ---------------------------------------------------------------- roles (plans: pure)


def test_roles_researcher_serves_and_node_dials_the_grpc_port():
    from hpcfed import frameworks
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site

    fbm = frameworks.table()["fedbiomed"]
    researcher, node = fbm["researcher"], fbm["node"]
    assert (researcher.side, researcher.serves) == ("server", (("researcher", 50051),))
    assert (node.side, node.dials) == ("client", (("researcher", 50051),))
    assert researcher.forwards("10.9.0.2", 50051) == ((), ("50051=127.0.0.1:50051",))
    assert node.forwards("10.9.0.2", 50051, bind="127.0.11.1") == (
        ("127.0.11.1:50051=10.9.0.2:50051",),
        (),
    )

    def plan(role, **kw):
        return build_plan(
            site=load_site("local"), role=role, name="fbm-test", deployment_id="0123456789ab",
            user="alice", kit="/k", tunnel_config="/t.conf", server_address=(SERVER, 50051), **kw,
        )  # fmt: skip

    r = plan(researcher, remote_forwards=researcher.forwards("10.9.0.2", 50051)[1])
    # The researcher's certificate names SERVER: it resolves where -R delivers.
    assert r.tunnel.hosts == ((SERVER, "127.0.0.1"),)
    assert r.env["FBM_RESEARCHER_COMPONENT_ROOT"] == "/fl/workspace/component"
    n = plan(node, local_forwards=node.forwards("10.9.0.2", 50051, bind="127.0.11.1")[0])
    assert n.tunnel.hosts == ((SERVER, "127.0.11.1"),)
    # After a requeue the PID Fed-BioMed recorded may be another process's: --force.
    assert "start --force" in n.command[-1]
    assert frameworks.one_image("fedbiomed") and not frameworks.one_image("nvflare")


# ---------------------------------------------------------------- inputs at submit


def _component(root: Path, role: str) -> Path:
    """The part of a component that submit reads: the server address in etc/config.ini."""
    (root / "etc").mkdir(parents=True)
    section = "[server]\nhost" if role == "researcher" else "[researcher]\nip"
    (root / "etc" / "config.ini").write_text(f"{section} = {SERVER}\nport = 50051\n")
    return root


def _dataset(tmp_path: Path, site: str, **override) -> Path:
    data = tmp_path / "data" / site
    data.mkdir(parents=True, exist_ok=True)
    (data / "rows.csv").write_text("x,y\n1,10\n")
    desc = {"path": str(data / "rows.csv"), "data_type": "csv", "tags": "hpcfed-test",
            "description": f"{site} rows", "name": f"{site}-data"}  # fmt: skip
    desc.update(override)
    path = tmp_path / f"{site}.json"
    path.write_text(json.dumps({k: v for k, v in desc.items() if v is not None}))
    return path


def _dry_node(tmp_path, *args):
    conf = tmp_path / "wg.conf"
    conf.write_text("")
    return hpcfed(
        "submit", "node", "--site", "local", "--name", "fbm-node", "--kit",
        str(_component(tmp_path / "node-comp", "node")), "--tunnel-config", str(conf),
        "--server-ip", "10.220.0.2", "--dry-run", "--json", *args,
    )  # fmt: skip


def test_a_nodes_datasets_are_checked_copied_and_their_data_mounted(tmp_path):
    desc = _dataset(tmp_path, "site-1")
    proc = _dry_node(tmp_path, "--input", f"dataset={desc}")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert plan["inputs"] == [
        {"name": "dataset", "source": str(desc), "dest": "datasets/site-1.json"}
    ]
    data_dir = str(tmp_path / "data" / "site-1")
    assert f"{data_dir}:{data_dir}:ro" in plan["container"]["binds"]
    # --kit's component names the researcher: it resolves to the node's own forward.
    ((name, address),) = plan["tunnel"]["hosts"]
    assert name == SERVER and plan["tunnel"]["local_forwards"] == [
        f"{address}:50051=10.220.0.2:50051"
    ]
    assert "dataset add --file" in plan["command"][-1]


@pytest.mark.parametrize(
    "override, shown",
    [
        ({"tags": ["hpcfed-test"]}, 'tags must be a string (one string: "a,b", not a list)'),
        ({"name": "ab"}, "name 'ab': at least 3 characters"),
        ({"tags": "ok-tag,xy"}, "tags: 'xy': each tag at least 3 characters"),
        ({"data_type": None}, "missing data_type"),
        ({"path": "rows.csv"}, "an absolute path on the cluster"),
        ({"path": "/nonexistent/rows.csv"}, "path /nonexistent/rows.csv: no such file"),
    ],
)
def test_a_bad_dataset_description_is_one_line_at_submit(tmp_path, override, shown):
    desc = _dataset(tmp_path, "site-1", **override)
    proc = _dry_node(tmp_path, "--input", f"dataset={desc}")
    assert proc.returncode in (3, 8), proc.stderr  # ConfigError, NotFound
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(desc) in lines[0] and shown in lines[0], lines


@pytest.mark.parametrize(
    "args, shown",
    [
        (("--input", "script=x.py"), "takes no input 'script' (inputs: dataset)"),
        (("--input", "dataset"), "expected NAME=FILE"),
        (("--input", "dataset=/nonexistent.json"), "no such file"),
    ],
)
def test_bad_inputs_are_one_line_at_submit(tmp_path, args, shown):
    proc = _dry_node(tmp_path, *args)
    assert proc.returncode in (3, 8), proc.stderr  # ConfigError, NotFound
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and shown in lines[0], lines


def test_the_researcher_needs_its_experiment(tmp_path):
    comp = _component(tmp_path / "r-comp", "researcher")
    proc = hpcfed("submit", "researcher", "--site", "local", "--kit", str(comp), "--dry-run")
    assert proc.returncode == 3
    assert "--input experiment=FILE: the fedbiomed researcher needs its experiment" in proc.stderr
    script = tmp_path / "exp.py"
    script.write_text("print('hello')\n")
    proc = hpcfed(
        "submit", "researcher", "--site", "local", "--kit", str(comp), "--dry-run", "--json",
        "--input", f"experiment={script}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"]["inputs"][0]["dest"] == "experiment.py"


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_inputs_are_a_snapshot_in_the_deployments_directory(slurm_cluster, tmp_path):
    """Copied at submit: the job reads the copy, whatever happens to the file afterwards."""
    pw = pwd.getpwnam(USER)
    name = f"fbm-in-{uuid.uuid4().hex[:6]}"
    own = Path(pw.pw_dir) / name  # the user's own file (pytest's tmp_path is root's, 0700)
    own.mkdir()
    script = own / "exp.py"
    script.write_text("print('snapshot-1')\n")
    for path in (own, script):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    proc = hpcfed(
        "submit", "researcher", "--site", "local", "--name", name, "--gpus", "0",
        "--input", f"experiment={script}", "--command", "sleep 2; cat experiment.py; sleep 300",
        "--json", user=USER,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script.write_text("print('changed')\n")
    try:
        deadline = time.monotonic() + 90
        log = ""
        while "snapshot-1" not in log:
            assert time.monotonic() < deadline, log
            time.sleep(1)
            log = hpcfed("logs", name, user=USER).stdout
        assert "changed" not in log
        workdir = Path(json.loads(proc.stdout)["workdir"])
        if not workdir.is_absolute():
            workdir = Path(pw.pw_dir) / workdir
        copy = workdir / "experiment.py"
        assert copy.read_text() == "print('snapshot-1')\n"
        # The user's own, 0600 from the first byte: an input may be something they keep private.
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and copy.stat().st_uid == pw.pw_uid
    finally:
        hpcfed("cancel", name, user=USER)
        shutil.rmtree(own, ignore_errors=True)


# ---------------------------------------------------------------- Slurm jobs through the hub


@pytest.fixture(scope="module")
def fbm_federation(slurm_cluster, fedbiomed_image):
    """demo/fedbiomed.py's federation (what `make demo FRAMEWORK=fedbiomed` runs): a researcher
    component and three node components (hospital-a on node2; hospital-b's two nodes both on
    node3), a wireguard-go hub in a network namespace, the three node jobs running."""
    for tool in ("wireguard-go", "wg"):
        need(shutil.which(tool) is not None, f"{tool} is not installed (scripts/bootstrap)")
    import sys

    sys.path.append(str(Path(__file__).resolve().parent.parent))  # demo/
    os.environ["HPCFED_DEMO_FEDBIOMED_SIF"] = fedbiomed_image
    from demo import fedbiomed as demo

    if demo.STATE_DIR.exists() or demo.DEMO.root.exists():
        demo.FedBiomedFederation().down()
    fed = demo.FedBiomedFederation(demo.State())
    try:
        fed.prepare()
        fed.nodes = fed.launch_nodes()
        yield fed
    finally:
        for name in fed.state.deployments:
            print(f"----- hpcfed logs {name}")
            print(fed.log(name)[-4000:])
        fed.down()


RESET = "connection to the researcher was reset"  # the supervisor's line (roles.yaml failures)


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.wireguard
@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
@pytest.mark.timeout(600)
def test_nodes_outlast_a_researcher_whose_tunnel_is_up_before_it_listens(fbm_federation):
    """The start-order race of a real federation, made certain rather than left to chance: the
    researcher's job has its tunnel up (its -R delivers the gRPC port to 127.0.0.1) but nothing
    listens there yet. A node's poll is accepted by its own local forward, carried through the
    hub and reset at the researcher's end; Fed-BioMed stops the node on that reset and exits 0.
    hpcfed starts the node again (roles.yaml `failures`), so every node job keeps running and
    the experiment of the next test finds all of them."""
    from demo.fedbiomed import DEMO, SERVER_NAME

    fed = fbm_federation
    before = {n: fed.log(n).count(RESET) for n in fed.nodes}
    silent = "fbm-researcher-not-listening"
    DEMO.hpcfed(
        "submit", "researcher", "--site", "fbm-local", "--name", silent, "--gpus", "0",
        "--image", fed.state.image,
        "--tunnel-config", str(fed.userdir / f"{SERVER_NAME}.wg.conf"),
        "--command", "sleep 600",
    )  # fmt: skip
    fed.state.deployments.append(silent)  # the fixture's teardown cancels it if this fails
    fed.state.save()

    def restarted() -> dict:
        """Per node whose new reset shows the node started again: its log from that reset on
        (Fed-BioMed's own line just before it names the exception)."""
        out = {}
        for n in fed.nodes:
            log = fed.log(n)
            at = -1
            for _ in range(before[n] + 1):
                at = log.find(RESET, at + 1)
                if at < 0:
                    break
            if at >= 0 and "starting fedbiomed node" in log[at:]:
                out[n] = log[log.rfind("\n", 0, log.rfind("This will stop gRPC client", 0, at)) :]
        return out

    deadline = time.monotonic() + 180
    while len(done := restarted()) < len(fed.nodes):
        assert time.monotonic() < deadline, {n: fed.log(n)[-2000:] for n in fed.nodes}
        time.sleep(3)
    DEMO.hpcfed("cancel", silent)
    for after in done.values():
        # Fed-BioMed's words for what happened, then hpcfed's: the known failure, the restart
        assert "This will stop gRPC client" in after.split(RESET)[0], after
        assert "retrying in 10s" in after, after
    status = fed.status(*fed.nodes)
    assert all(status[n]["job_state"] == "RUNNING" for n in fed.nodes), status


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.wireguard
@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
@pytest.mark.timeout(1800)
def test_researcher_and_nodes_as_slurm_jobs_meet_only_through_the_hub(fbm_federation):
    from demo.fedbiomed import NODES, SERVER_NAME, expected_mean

    fed = fbm_federation
    before = fed.hub_traffic()
    # A node preempted before the researcher starts: a high-priority job takes every GPU of
    # hospital-a's node; the node job requeues itself and comes back with its component.
    victim = "fbm-hospital-a"
    job_id = fed.status(victim)[victim]["job_id"]
    slurm = {"SLURM_CONF": "/var/lib/hpcfed/testcluster/etc/slurm.conf"}
    high = run(
        ["sbatch", "--parsable", "-p", "high", "-w", "node2", "--gres=gpu:a40:4",
         "--chdir=/tmp", "-o", "/dev/null", "--wrap", "sleep 15"],
        env=slurm,
    )  # fmt: skip
    assert high.returncode == 0, high.stderr
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, fed.status(victim)
        shown = run(["scontrol", "show", "job", job_id, "-o"], env=slurm).stdout
        again = fed.status(victim)[victim]
        if "Restarts=0" not in shown and again["job_state"] == "RUNNING":
            break
        time.sleep(2)
    assert again["job_id"] == job_id
    assert any(e["event"] == "role-stopped" for e in again["events"]), again["events"]
    researcher = fed.submit_researcher()
    # The exact pooled mean over every node's rows (3.5, not a mean of the nodes' means): the
    # requeued node is counted.
    assert fed.result(researcher) == expected_mean() == {"x": 3.5, "y": 35.0}
    status = fed.status(researcher, *fed.nodes)
    # A researcher's normal end is the job's end, not a loss.
    assert status[researcher]["job_state"] == "COMPLETED", status[researcher]
    # Two nodes of one site on one compute node, each with its own component and dataset; the
    # node jobs are still running, ready for the next experiment.
    assert status["fbm-hospital-b"]["node"] == status["fbm-hospital-b2"]["node"] == "node3"
    assert all(status[n]["job_state"] == "RUNNING" for n in fed.nodes), status
    logs = {n: fed.log(n) for n in fed.nodes}
    for log in logs.values():
        assert "hpcfed: registering dataset datasets/" in log, log[-3000:]
    # Each node reached the researcher only at its own tunnel forward; the two on node3 on
    # different loopback addresses.
    mapped = {
        n: next(x for x in logs[n].splitlines() if f"container /etc/hosts: {SERVER_NAME} ->" in x)
        for n in fed.nodes
    }
    assert len({line.rsplit(" ", 1)[-1] for line in mapped.values()}) == len(NODES), mapped
    after = fed.hub_traffic()
    for peer in [SERVER_NAME, *NODES]:
        moved = after[peer].get("rx_bytes", 0) - before[peer].get("rx_bytes", 0)
        assert moved > 1000, (peer, before[peer], after[peer])


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.wireguard
@pytest.mark.apptainer
@pytest.mark.fedbiomed_image
@pytest.mark.timeout(1200)
def test_secure_aggregation_through_the_hub_gives_the_same_mean(fbm_federation):
    from demo.fedbiomed import expected_mean

    fed = fbm_federation
    researcher = fed.submit_researcher(secagg=True)
    mean = fed.result(researcher)
    # Secure aggregation sums fixed-point encodings: the pooled mean up to its quantisation
    # (measured: 34.9922 for 35), far from the mean of the nodes' means (4.17 / 41.7).
    assert mean == pytest.approx(expected_mean(), abs=0.05), mean
    assert "Aggregating encrypted parameters" in fed.log(researcher)
