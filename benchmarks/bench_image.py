"""Image build time and container start overhead, with the real Apptainer and the real test cluster.

Run (as root, after scripts/bootstrap.d/30-apptainer.sh):  python benchmarks/bench_image.py [--runs 3]
Measures:
  - `hpcfed image build client --framework nvflare` from the offline bookworm base, as the
    non-root test user (--fakeroot) and as root, per SIF compression (pip install from PyPI included);
  - `apptainer exec` of the argv jobs use (hpcfed.container.apptainer.exec_argv), to a trivial command;
  - job start → role start on the local Slurm cluster via `hpcfed submit`, with and without --image:
    the job script's first line (profile `setup`) prints a timestamp, the role prints another.
Writes benchmarks/results/image.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
from benchmarks.machine import describe  # noqa: E402

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
BASE_SIF = "/var/cache/hpcfed/base-bookworm.sif"
VERSION = "2.9.0"


def stats(values) -> str:
    values = sorted(values)
    return f"median {statistics.median(values):.2f} s (min {values[0]:.2f}, max {values[-1]:.2f}, n={len(values)})"


def as_user(user, argv, env=None, **kw):
    full = dict(os.environ, **(env or {}))
    if user:
        pw = pwd.getpwnam(user)
        full.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        argv = ["runuser", "-u", user, "--"] + list(argv)
    return subprocess.run(argv, env=full, capture_output=True, text=True, **kw)


def user_dir(user, prefix):
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def bench_build(user, compression, image_dir):
    t0 = time.monotonic()
    proc = as_user(
        user,
        HPCFED
        + [
            "image",
            "build",
            "client",
            "--framework",
            "nvflare",
            "--version",
            VERSION,
            "--base",
            f"localimage:{BASE_SIF}",
            "--compression",
            compression,
            "--image-dir",
            image_dir,
            "--json",
        ],
        timeout=1800,
    )
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed: {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def bench_exec(user, image, runs):
    from hpcfed.container.apptainer import exec_argv

    ws = user_dir(user, "hpcfed-bench-ws-")
    argv, env = exec_argv(
        apptainer="apptainer",
        image=image,
        command=["true"],
        gpu_flag="nv",
        binds=[],
        kit_dir=None,
        workspace=ws,
        env={},
        hosts_file=None,
        job_env={},
    )
    times = []
    for _ in range(runs + 1):
        t0 = time.monotonic()
        proc = as_user(user, argv, env=env)
        times.append(time.monotonic() - t0)
        if proc.returncode != 0:
            sys.exit(f"exec failed: {proc.stderr}")
    shutil.rmtree(ws, ignore_errors=True)
    return times[1:]  # the first run warms the page cache


def bench_job_start(user, image, runs):
    """Seconds from the job script's first line to the role's first line, per run."""
    env = {"HPCFED_SITE__SETUP": '["echo JOBSTART=$(date +%s.%N)"]'}
    out = []
    for _ in range(runs):
        name = f"bench-{uuid.uuid4().hex[:6]}"
        args = [
            "submit",
            "client",
            "--site",
            "local",
            "--gpus",
            "1",
            "--name",
            name,
            "--command",
            "echo ROLESTART=$(date +%s.%N)",
            "--json",
        ]
        if image:
            args += ["--image", image]
        proc = as_user(user, HPCFED + args, env=env, timeout=120)
        if proc.returncode != 0:
            sys.exit(f"submit failed: {proc.stderr}")
        deadline = time.monotonic() + 120
        marks: dict = {}
        log = ""
        while time.monotonic() < deadline and "ROLESTART" not in marks:
            time.sleep(0.3)
            log = as_user(user, HPCFED + ["logs", name], env=env).stdout
            # only the lines the commands printed (the supervisor also logs the command text)
            marks = dict(
                line.split("=", 1)
                for line in log.splitlines()
                if line.startswith(("JOBSTART=", "ROLESTART="))
            )
        if len(marks) != 2:
            sys.exit(f"job {name}: no timestamps in its log: {log!r}")
        out.append(float(marks["ROLESTART"]) - float(marks["JOBSTART"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--user", default="hpcuser", help="non-root user of the test cluster")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (starts the test cluster and builds as root too)")
    up = subprocess.run(HPCFED + ["testcluster", "up", "--json"], capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"testcluster up failed: {up.stderr}")
    os.environ.update(json.loads(up.stdout)["env"])
    version = subprocess.run(
        ["apptainer", "--version"], capture_output=True, text=True
    ).stdout.strip()

    rows = []
    image_dir = user_dir(args.user, "hpcfed-bench-img-")
    image = None
    try:
        for who, user in (("non-root (--fakeroot)", args.user), ("root", None)):
            for compression in ("zstd", "gzip"):
                d = user_dir(user, "hpcfed-bench-build-")
                try:
                    seconds, record = bench_build(user, compression, d)
                    if user and compression == "zstd":
                        image = shutil.copy(record["path"], image_dir)
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                rows.append((who, compression, seconds, record["size_mb"]))
                print(
                    f"build {who} {compression}: {seconds:.1f} s, {record['size_mb']} MB",
                    file=sys.stderr,
                )

        exec_root = bench_exec(None, image, args.runs * 3)
        exec_user = bench_exec(args.user, image, args.runs * 3)
        start_plain = bench_job_start(args.user, None, args.runs)
        start_image = bench_job_start(args.user, image, args.runs)
    finally:
        shutil.rmtree(image_dir, ignore_errors=True)

    out = ROOT / "benchmarks" / "results" / "image.md"
    builds = "\n".join(f"| {w} | {c} | {s:.1f} s | {mb} MB |" for w, c, s, mb in rows)
    out.write_text(
        "# Image build time and container start overhead\n\n"
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        "`python benchmarks/bench_image.py`.\n\n"
        f"Machine: {describe()}, {version}. Shared with other work while measured.\n\n"
        f"## `hpcfed image build client --framework nvflare --version {VERSION}` (offline base)\n\n"
        "Base: the debootstrap'd bookworm minbase SIF with python3; `%post` creates a venv and pip-installs\n"
        "NVFlare from PyPI (network time included); `%test` runs; then the SIF is compressed.\n\n"
        "| as | compression | build | SIF size |\n|---|---|---|---|\n"
        f"{builds}\n\n"
        "## Container start\n\n"
        f"- `apptainer exec --nv --cleanenv --containall ... true` as root: {stats(exec_root)}\n"
        f"- the same as the non-root user (SIF mounted with squashfuse): {stats(exec_user)}\n\n"
        "## Job start → role start (local Slurm cluster, `hpcfed submit --gpus 1`)\n\n"
        "From the job script's first line to the role's first line: hpcfed's supervisor start,\n"
        "GPU preflight (skipped: no NVML here), workspace, then the role.\n\n"
        f"- role without a container: {stats(start_plain)}\n"
        f"- role in the SIF (`--image`): {stats(start_image)}\n"
        f"- container overhead (difference of medians): "
        f"{statistics.median(start_image) - statistics.median(start_plain):.2f} s\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
