"""Roles in Apptainer containers: the exec argv (pure), `hpcfed image build/list`, and real runs.

The real parts are real: Apptainer 1.4 (scripts/bootstrap.d/30-apptainer.sh), an NVFlare client
image built by `hpcfed image build` as the non-root test user from the offline bookworm base, a
real NVFlare startup kit (`nvflare provision`), and jobs on the local Slurm test cluster submitted
with `hpcfed submit --image`, as root and as the non-root user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, need, run

from hpcfed.container.apptainer import KIT_MOUNT, WORKSPACE_MOUNT, exec_argv
from hpcfed.container.images import missing_root_caps, parse_base, plan_build
from hpcfed.errors import ConfigError

BASE_SIF = os.environ.get("HPCFED_TEST_BASE_SIF", "/var/cache/hpcfed/base-bookworm.sif")
NVFLARE_VERSION = "2.9.0"


# ---------------------------------------------------------------- exec argv (pure)


def _argv(**changes):
    kwargs = dict(
        apptainer="apptainer",
        image="/img/client.sif",
        command=["python", "-m", "role"],
        gpu_flag="nv",
        binds=["/scratch/data:/data:ro"],
        kit_dir="/home/u/kit",
        workspace="/home/u/ws",
        env={"ROLE_TOKEN": "s3cret"},
        hosts_file="/home/u/hosts",
        job_env={
            "CUDA_VISIBLE_DEVICES": "2,3",
            "SLURM_JOB_GPUS": "6,7",
            "SLURM_JOB_ID": "42",
            "HOME": "/home/u",
            "AWS_SECRET_ACCESS_KEY": "nope",
        },
    )
    kwargs.update(changes)
    return exec_argv(**kwargs)


def test_exec_argv_isolates_the_role_and_mounts_kit_read_only():
    argv, env = _argv()
    assert argv[:3] == ["apptainer", "exec", "--nv"]
    assert "--cleanenv" in argv and "--containall" in argv
    assert argv[argv.index("--pwd") + 1] == WORKSPACE_MOUNT
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == [
        "/scratch/data:/data:ro",
        f"/home/u/kit:{KIT_MOUNT}:ro",
        f"/home/u/ws:{WORKSPACE_MOUNT}",
        "/home/u/hosts:/etc/hosts:ro",
    ]
    assert argv[-4:] == ["/img/client.sif", "python", "-m", "role"]
    # Only the role's variables and the job's GPU selection/identity reach the container.
    assert env == {
        "APPTAINERENV_CUDA_VISIBLE_DEVICES": "2,3",
        "APPTAINERENV_SLURM_JOB_GPUS": "6,7",
        "APPTAINERENV_SLURM_JOB_ID": "42",
        "APPTAINERENV_ROLE_TOKEN": "s3cret",
    }
    assert not any("s3cret" in a for a in argv)  # secrets travel in the environment, never argv


def test_exec_argv_gpu_flag_and_optional_parts():
    argv, _ = _argv(gpu_flag="rocm", kit_dir=None, hosts_file=None, binds=[])
    assert argv[2] == "--rocm" and not any(KIT_MOUNT in a or "/etc/hosts" in a for a in argv)
    argv, _ = _argv(gpu_flag=None)
    assert "--nv" not in argv and "--rocm" not in argv


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"gpu_flag": "cuda"}, "gpu flag 'cuda'"),
        ({"kit_dir": "/a:b"}, "kit dir '/a:b'"),
        ({"binds": ["/x:/y:rx"]}, "bind '/x:/y:rx'"),
        ({"env": {"BAD-NAME": "1"}}, "'BAD-NAME' is not a valid variable name"),
        ({"command": []}, "entry command is empty"),
    ],
)
def test_exec_argv_rejects_bad_input(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _argv(**changes)


# ---------------------------------------------------------------- build plan (pure)


def test_base_forms():
    assert parse_base("docker://python:3.11-slim") == ("docker", "python:3.11-slim")
    assert parse_base("localimage:/srv/base.sif") == ("localimage", "/srv/base.sif")
    assert parse_base("/srv/sandbox") == ("localimage", "/srv/sandbox")
    with pytest.raises(ConfigError, match="--base 'http://x'"):
        parse_base("http://x")


def test_plan_pins_the_version_and_uses_fakeroot_for_normal_users():
    plan = plan_build(
        "server",
        framework="nvflare",
        version="2.9.0",
        base="localimage:/b.sif",
        image_dir="/imgs",
        as_root=False,
        ca_bundle="/etc/ca.pem",
    )
    assert plan.output == "/imgs/nvflare-server-2.9.0.sif" and plan.fakeroot
    assert plan.definition.endswith("hpcfed/apptainer/nvflare-server.def") and os.path.isfile(
        plan.definition
    )
    assert plan.build_args["FRAMEWORK_VERSION"] == "2.9.0" and plan.build_args["FROM"] == "/b.sif"
    with pytest.raises(ConfigError, match="--version None"):
        plan_build(
            "client", framework="nvflare", version=None, base=None, image_dir="/i", as_root=True
        )


def test_missing_root_capabilities_are_named():
    # CAP_SYS_RESOURCE (bit 24) missing from the bounding set, as on these machines.
    assert missing_root_caps("Name:\tx\nCapBnd:\t000001fffeffffff\n") == ["CAP_SYS_RESOURCE"]
    assert missing_root_caps("CapBnd:\t000001ffffffffff\n") == []


# ---------------------------------------------------------------- CLI errors (no build)


def test_build_without_apptainer_says_what_to_do(tmp_path):
    # A PATH with hpcfed's venv and an empty folder: no apptainer whatever this machine has.
    (tmp_path / "empty").mkdir()
    env = {"PATH": os.path.dirname(sys.executable) + ":" + str(tmp_path / "empty")}
    proc = hpcfed("image", "build", "client", "--version", "2.9.0", "--image-dir", "/tmp", env=env)
    assert proc.returncode == 7, proc.stderr
    assert (
        proc.stderr.startswith("hpcfed: error: apptainer not found on PATH")
        and "srun" in proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--version", "2.9;rm"], 3, "--version '2.9;rm'"),
        (
            ["--version", "2.9.0", "--base", "localimage:/nonexistent/base.sif"],
            8,
            "--base localimage:/nonexistent/base.sif: no such image",
        ),
    ],
)
def test_build_bad_input_is_one_line(args, code, message):
    proc = hpcfed("image", "build", "client", *args, "--image-dir", "/tmp/hpcfed-never-built")
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists("/tmp/hpcfed-never-built/nvflare-client-2.9;rm.sif")


def test_build_stores_in_the_site_profiles_image_dir(tmp_path):
    env = {"HPCFED_SITE__APPTAINER__IMAGE_DIR": str(tmp_path / "site-images")}
    proc = hpcfed(
        "image",
        "build",
        "server",
        "--version",
        "2.9.0",
        "--site",
        "local",
        "--dry-run",
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["output"] == str(tmp_path / "site-images" / "nvflare-server-2.9.0.sif")
    assert (
        plan["base"] == "docker://python:3.11-slim" and "FRAMEWORK_VERSION=2.9.0" in plan["command"]
    )
    assert not (tmp_path / "site-images").exists()  # a dry run builds and creates nothing
    listed = hpcfed("image", "list", "--site", "local", "--json", env=env)
    assert json.loads(listed.stdout)["source"] == "site local (apptainer.image_dir)"


# ---------------------------------------------------------------- real Apptainer


@pytest.fixture(scope="module")
def nonroot(slurm_cluster):
    """The test cluster's non-root user (it has /etc/subuid ranges for --fakeroot)."""
    return slurm_cluster.user


def _user_dir(user: str, prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@pytest.fixture(scope="module")
def client_image(nonroot):
    """The NVFlare client SIF built once by `hpcfed image build` as the non-root user, offline base."""
    need(
        shutil.which("apptainer") is not None,
        "apptainer is not installed (scripts/bootstrap.d/30-apptainer.sh)",
    )
    need(
        os.path.isfile(BASE_SIF),
        f"offline base image {BASE_SIF} missing (scripts/bootstrap.d/30-apptainer.sh)",
    )
    image_dir = _user_dir(nonroot, "hpcfed-images-")
    started = time.monotonic()
    proc = hpcfed(
        "image",
        "build",
        "client",
        "--framework",
        "nvflare",
        "--version",
        NVFLARE_VERSION,
        "--base",
        f"localimage:{BASE_SIF}",
        "--compression",
        "zstd",
        "--image-dir",
        image_dir,
        "--json",
        user=nonroot,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    record["build_seconds"] = time.monotonic() - started
    record["stderr"] = proc.stderr
    yield record
    shutil.rmtree(image_dir, ignore_errors=True)


@pytest.mark.apptainer
@pytest.mark.timeout(900)
def test_image_build_as_non_root_user_and_list(client_image, nonroot):
    path = client_image["path"]
    assert os.path.basename(path) == f"nvflare-client-{NVFLARE_VERSION}.sif"
    assert pwd.getpwuid(os.stat(path).st_uid).pw_name == nonroot  # built by the user, no root
    assert "(fakeroot)" in client_image["stderr"] and "Running testscript" in client_image["stderr"]
    labels = client_image["labels"]
    assert labels["org.hpcfed.framework"] == "nvflare"
    assert labels["org.hpcfed.framework-version"] == NVFLARE_VERSION
    assert labels["org.hpcfed.role"] == "client"
    assert labels["org.hpcfed.base"] == f"localimage:{BASE_SIF}"
    # no temporary files left behind, and the build's CA bundle is not kept in the image
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    probe = run(
        [
            "apptainer",
            "exec",
            path,
            "sh",
            "-c",
            "test ! -e /opt/fl/build-ca.pem && nvflare --version",
        ],
        user=nonroot,
    )
    assert probe.returncode == 0 and NVFLARE_VERSION in probe.stdout, probe.stderr

    listed = hpcfed("image", "list", "--image-dir", os.path.dirname(path), "--json", user=nonroot)
    assert listed.returncode == 0, listed.stderr
    images = json.loads(listed.stdout)["images"]
    assert [(i["name"], i["role"], i["framework_version"]) for i in images] == [
        (f"nvflare-client-{NVFLARE_VERSION}.sif", "client", NVFLARE_VERSION)
    ]
    table = hpcfed("image", "list", "--image-dir", os.path.dirname(path), user=nonroot).stdout
    assert "nvflare-client-2.9.0.sif" in table and "client" in table


@pytest.mark.apptainer
@pytest.mark.timeout(300)
def test_build_of_an_unknown_framework_version_says_so_and_leaves_nothing(tmp_path):
    need(shutil.which("apptainer") is not None, "apptainer is not installed")
    need(os.path.isfile(BASE_SIF), f"offline base image {BASE_SIF} missing")
    proc = hpcfed(
        "image",
        "build",
        "client",
        "--version",
        "0.0.1",
        "--base",
        BASE_SIF,
        "--compression",
        "zstd",
        "--image-dir",
        str(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "hpcfed: error: --version 0.0.1: nvflare==0.0.1 is not on the package index "
        "(pip: No matching distribution found)"
    )
    assert os.listdir(tmp_path) == []


PROBE = (
    'echo "CVD=${CUDA_VISIBLE_DEVICES:-unset} ON_NODE=${SLURM_GPUS_ON_NODE:-unset}"; '
    'echo "LEAK=${HPCFED_TEST_HOST_VAR:-absent} ROLE=${HPCFED_TEST_ROLE_VAR:-absent}"; '
    "cat /fl/kit/startup/fed_client.json >/dev/null && echo KIT_READ=yes; "
    "(touch /fl/kit/probe 2>/dev/null && echo KIT_WRITE=yes) || echo KIT_WRITE=no; "
    'touch ./probe && echo WS_WRITE=yes; echo "PWD=$(pwd)"; '
    'ls -A "$HOME" | grep -q hpcfed-home-marker && echo HOME_LEAK=yes || echo HOME_LEAK=no; '
    "python -c \"import nvflare; print('NVFLARE=' + nvflare.__version__)\""
)


def _facts(output: str) -> dict:
    facts = {}
    for line in output.splitlines():
        for word in line.split():
            if "=" in word and word.split("=")[0].isupper():
                key, _, value = word.partition("=")
                facts[key] = value
    return facts


@pytest.fixture(scope="module")
def client_kit(nonroot):
    """A real NVFlare client startup kit (offline `nvflare provision`), owned by the non-root user."""
    nvflare = Path(sys.executable).parent / "nvflare"
    need(nvflare.exists(), "the nvflare package is not installed in the venv")
    work = tempfile.mkdtemp(prefix="hpcfed-prov-")
    subprocess.run([str(nvflare), "provision", "-g"], cwd=work, check=True, capture_output=True)
    subprocess.run(
        [str(nvflare), "provision", "-p", "project.yml", "-w", "ws", "--force"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    kits = _user_dir(nonroot, "hpcfed-kit-")
    kit = os.path.join(kits, "site-1")
    shutil.copytree(os.path.join(work, "ws", "example_project", "prod_00", "site-1"), kit)
    shutil.rmtree(work)
    run(["chown", "-R", f"{nonroot}:", kits], check=True)
    yield kit
    shutil.rmtree(kits, ignore_errors=True)


@pytest.mark.apptainer
@pytest.mark.timeout(900)
@pytest.mark.parametrize("who", ["root", "nonroot"])
def test_exec_argv_runs_for_real(client_image, client_kit, nonroot, who):
    user = None if who == "root" else nonroot
    ws = _user_dir(nonroot, "hpcfed-ws-")
    hosts = os.path.join(ws, "hosts")
    Path(hosts).write_text("127.0.0.1 localhost\n10.99.0.1 server1\n")
    home = pwd.getpwnam(user or "root").pw_dir
    marker = os.path.join(home, "hpcfed-home-marker")
    Path(marker).touch()
    try:
        argv, env = exec_argv(
            apptainer="apptainer",
            image=client_image["path"],
            command=["sh", "-c", PROBE + "; getent hosts server1"],
            gpu_flag="nv",
            binds=[],
            kit_dir=client_kit,
            workspace=ws,
            env={"HPCFED_TEST_ROLE_VAR": "given"},
            hosts_file=hosts,
            job_env={"CUDA_VISIBLE_DEVICES": "1", "SLURM_GPUS_ON_NODE": "1"},
        )
        proc = run(argv, env={**env, "HPCFED_TEST_HOST_VAR": "leaked"}, user=user)
    finally:
        os.unlink(marker)
        probe_left = os.path.exists(os.path.join(ws, "probe"))
        shutil.rmtree(ws, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    facts = _facts(proc.stdout)
    assert facts["CVD"] == "1" and facts["ON_NODE"] == "1"
    assert facts["LEAK"] == "absent" and facts["ROLE"] == "given"
    assert facts["KIT_READ"] == "yes" and facts["KIT_WRITE"] == "no"
    assert facts["WS_WRITE"] == "yes" and facts["PWD"] == WORKSPACE_MOUNT
    assert probe_left and not os.path.exists(os.path.join(client_kit, "probe"))
    assert facts["HOME_LEAK"] == "no"
    assert facts["NVFLARE"] == NVFLARE_VERSION
    assert "10.99.0.1" in proc.stdout  # the generated hosts file resolves the server name


# ---------------------------------------------------------------- through hpcfed submit


def _submit(user, *args, env=None):
    return hpcfed(
        "submit", "client", "--site", "local", *args, "--json", user=user, env=env, timeout=120
    )


def _finished_log(user, name, timeout=120):
    deadline = time.monotonic() + timeout
    dep = None
    while time.monotonic() < deadline:
        proc = hpcfed("status", name, "--json", user=user)
        if proc.returncode == 0:
            dep = json.loads(proc.stdout)["deployments"][0]
            if dep["job_state"] in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                log = ""
                for _ in range(20):  # the log may still be flushing
                    log = hpcfed("logs", name, user=user).stdout
                    if "role ended" in log:
                        break
                    time.sleep(0.5)
                return dep, log
        time.sleep(0.5)
    pytest.fail(f"{name} did not finish: {dep}")


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.nvflare
@pytest.mark.timeout(900)
@pytest.mark.parametrize("who", ["root", "nonroot"])
def test_submitted_role_runs_inside_the_built_image(
    slurm_cluster, client_image, client_kit, nonroot, who, request
):
    """Issue 5, first 'Done when': `hpcfed submit --image` on the test cluster runs the role in the
    SIF `hpcfed image build` made; it sees its GPUs, not an unpassed host variable, reads but
    cannot write the kit."""
    user = None if who == "root" else nonroot
    kit = client_kit
    if user is None:  # root gets its own copy of the kit
        kit = tempfile.mkdtemp(prefix="hpcfed-rootkit-") + "/site-1"
        shutil.copytree(client_kit, kit)
        request.addfinalizer(lambda: shutil.rmtree(os.path.dirname(kit), ignore_errors=True))
    # A variable of the job's environment (set by the profile's setup lines: the submitting
    # shell's own variables no longer reach any job, see test_job_env.py).
    host_env = {"HPCFED_SITE__SETUP": '["export HPCFED_TEST_HOST_VAR=must-not-leak"]'}
    name = f"ctr-{who}-{uuid.uuid4().hex[:6]}"
    proc = _submit(
        user,
        "--gpus",
        "1",
        "--name",
        name,
        "--image",
        client_image["path"],
        "--kit",
        kit,
        "--command",
        PROBE,
        env=host_env,
    )
    assert proc.returncode == 0, proc.stderr
    dep, log = _finished_log(user, name)
    assert dep["job_state"] == "COMPLETED", log
    # The preflight read the job's real Slurm GPU assignment; fake GPUs have no driver: skipped.
    line = next(l for l in log.splitlines() if "GPU preflight passed: " in l)
    report = json.loads(line.split("GPU preflight passed: ", 1)[1])
    assert report["skipped"].startswith("skipping: NVML") and report["assignment"]["count"] == 1
    assert report["assignment"]["slurm"] == [report["assignment"]["variables"]["SLURM_JOB_GPUS"]]
    assert "apptainer exec --nv --cleanenv --containall" in log and client_image["path"] in log
    facts = _facts(log)
    assert facts["CVD"].isdigit() and facts["ON_NODE"] == "1", log  # the one GPU Slurm assigned
    assert facts["LEAK"] == "absent", log
    assert facts["KIT_READ"] == "yes" and facts["KIT_WRITE"] == "no", log
    assert facts["WS_WRITE"] == "yes" and facts["PWD"] == WORKSPACE_MOUNT, log
    assert facts["NVFLARE"] == NVFLARE_VERSION and "role ended: exit code 0" in log
    assert not os.path.exists(os.path.join(kit, "probe"))

    if who == "root":
        # Control: the same variable does reach a job that runs without an image, so "absent"
        # above is the container's doing.
        name = f"ctr-control-{uuid.uuid4().hex[:6]}"
        proc = _submit(
            user,
            "--name",
            name,
            "--command",
            'echo "LEAK=${HPCFED_TEST_HOST_VAR:-absent}"',
            env=host_env,
        )
        assert proc.returncode == 0, proc.stderr
        _, log = _finished_log(user, name)
        assert _facts(log)["LEAK"] == "must-not-leak", log
