"""Image build time and container start overhead, with the real Apptainer and the real test cluster.

Run (as root, after scripts/bootstrap.d/30-apptainer.sh):  python benchmarks/bench_image.py [--runs 5]
Measures, each at least MIN_RUNS (5) times, the sides of each comparison interleaved run by run
(run 1 of every side, then run 2, ...) so that load drift on a shared machine hits all alike:
  - `hpcfed image build client --framework nvflare` from the offline bookworm base, as the
    non-root test user (--fakeroot) and as root, per SIF compression (pip install from PyPI included);
  - `apptainer exec` of the argv jobs use (hpcfed.container.apptainer.exec_argv), to a trivial
    command, as root and as the non-root user (3 × --runs each, after one warm-up);
  - job start → role start on the local Slurm cluster via `hpcfed submit`, with and without --image:
    the job script's first line (profile `setup`) prints a timestamp, the role prints another.
Starts the test cluster if it is down (and leaves it up). Writes benchmarks/results/image.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
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
from benchmarks.stats import MIN_RUNS, summary  # noqa: E402

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
BASE_SIF = "/var/cache/hpcfed/base-bookworm.sif"
VERSION = "2.9.0"


def cell(values, digits=1) -> str:
    """'median (min–max)'."""
    v = sorted(values)
    return f"{statistics.median(v):.{digits}f} ({v[0]:.{digits}f}–{v[-1]:.{digits}f})"


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


def build(user, compression, image_dir):
    """Seconds and the image record of one build."""
    argv = ["image", "build", "client", "--framework", "nvflare", "--version", VERSION]
    argv += ["--base", f"localimage:{BASE_SIF}", "--compression", compression]
    t0 = time.monotonic()
    proc = as_user(user, HPCFED + argv + ["--image-dir", image_dir, "--json"], timeout=1800)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed: {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def exec_once(user, argv, env):
    t0 = time.monotonic()
    proc = as_user(user, argv, env=env)
    if proc.returncode != 0:
        sys.exit(f"exec failed: {proc.stderr}")
    return time.monotonic() - t0


def job_start(user, image):
    """Seconds from the job script's first line to the role's first line, one job."""
    env = {"HPCFED_SITE__SETUP": '["echo JOBSTART=$(date +%s.%N)"]'}
    name = f"bench-{uuid.uuid4().hex[:6]}"
    args = ["submit", "client", "--site", "local", "--gpus", "1", "--name", name]
    args += ["--command", "echo ROLESTART=$(date +%s.%N)", "--json"]
    args += ["--image", image] if image else []
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
    return float(marks["ROLESTART"]) - float(marks["JOBSTART"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=MIN_RUNS)
    ap.add_argument("--user", default="hpcuser", help="non-root user of the test cluster")
    args = ap.parse_args()
    runs = max(args.runs, MIN_RUNS)
    if os.geteuid() != 0:
        sys.exit("run as root (starts the test cluster and builds as root too)")
    started, t_start, load_before = time.gmtime(), time.monotonic(), os.getloadavg()
    up = subprocess.run(HPCFED + ["testcluster", "up", "--json"], capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"testcluster up failed: {up.stderr}")
    os.environ.update(json.loads(up.stdout)["env"])
    version = subprocess.run(["apptainer", "--version"], capture_output=True, text=True).stdout
    from hpcfed.container.apptainer import exec_argv

    configs = [
        (who, user, comp)
        for who, user in (("non-root (--fakeroot)", args.user), ("root", None))
        for comp in ("zstd", "gzip")
    ]
    seconds: dict = {c: [] for c in configs}
    sizes: dict = {c: [] for c in configs}
    starts: dict = {"root": [], "user": [], "plain": [], "image": []}
    image_dir = user_dir(args.user, "hpcfed-bench-img-")
    ws = user_dir(args.user, "hpcfed-bench-ws-")
    try:
        for i in range(runs):
            for c in configs:
                d = user_dir(c[1], "hpcfed-bench-build-")
                try:
                    s, record = build(c[1], c[2], d)
                    if i == 0 and c == configs[0]:  # the image the start measurements use
                        image = shutil.copy(record["path"], image_dir)
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                seconds[c].append(s)
                sizes[c].append(record["size_mb"])
                print(f"run {i + 1} build {c[0]} {c[2]}: {s:.1f} s", file=sys.stderr, flush=True)

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
        for _ in range(runs * 3 + 1):  # the first pair warms the page cache: dropped below
            starts["root"].append(exec_once(None, argv, env))
            starts["user"].append(exec_once(args.user, argv, env))
        starts["root"], starts["user"] = starts["root"][1:], starts["user"][1:]
        for _ in range(runs):
            starts["plain"].append(job_start(args.user, None))
            starts["image"].append(job_start(args.user, image))
    finally:
        shutil.rmtree(image_dir, ignore_errors=True)
        shutil.rmtree(ws, ignore_errors=True)
    load_after, minutes = os.getloadavg(), (time.monotonic() - t_start) / 60

    builds = "\n".join(
        f"| {c[0]} | {c[2]} | {cell(seconds[c])} | {cell(sizes[c])} | "
        + ", ".join(f"{s:.1f}" for s in seconds[c])
        + " |"
        for c in configs
    )
    overhead = statistics.median(starts["image"]) - statistics.median(starts["plain"])
    out = ROOT / "benchmarks" / "results" / "image.md"
    out.write_text(
        "# Image build time and container start overhead\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M', started)} UTC ({minutes:.0f} min in all) by "
        f"`{shlex.join([sys.executable] + sys.argv)}`.\n\n"
        f"Machine: {describe()}, {version.strip()}. Shared with other work while measured: "
        f"1/5/15-min load average {'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after (2 vCPU).\n\n"
        f"## `hpcfed image build client --framework nvflare --version {VERSION}` (offline base)\n\n"
        "Base: the debootstrap'd bookworm minbase SIF with python3; `%post` creates a venv and\n"
        "pip-installs NVFlare from PyPI (no pip cache: every build downloads; network time\n"
        "included); `%test` runs; then the SIF is compressed (zstd at level 3, gzip at\n"
        "mksquashfs's default). Held equal: definition file, NVFlare version, base SIF, machine,\n"
        "network; a row differs from another only in the user (root, or the non-root user with\n"
        f"--fakeroot) and the compression. {runs} runs per row, interleaved: run 1 of the four\n"
        "rows in table order, then run 2, ...\n\n"
        "| as | compression | build s, median (min–max) | SIF MB, median (min–max) | "
        "build s per run, in order |\n|---|---|---|---|---|\n"
        f"{builds}\n\n"
        "## Container start\n\n"
        "`apptainer exec --nv --cleanenv --containall ... true` of the first non-root zstd image,\n"
        "as root and as the non-root user alternately (one warm-up each, not counted). Held\n"
        "equal: image, argv, machine; the user differs (root mounts the SIF with the kernel's\n"
        "squashfs, the non-root user with squashfuse).\n\n"
        f"- as root: {summary(starts['root'], digits=2)}\n"
        f"- as the non-root user: {summary(starts['user'], digits=2)}\n\n"
        "## Job start → role start (local Slurm cluster, `hpcfed submit --gpus 1`)\n\n"
        "From the job script's first line to the role's first line: hpcfed's supervisor start,\n"
        "GPU preflight (skipped: no NVML here), workspace, then the role. One job at a time as\n"
        "the non-root user, alternately without and with `--image` (the zstd image above); held\n"
        "equal: user, cluster, submit options and role command, only `--image` differs.\n\n"
        f"- role without a container: {summary(starts['plain'], digits=2)}\n"
        f"- role in the SIF (`--image`): {summary(starts['image'], digits=2)}\n"
        f"- container overhead (difference of medians): {overhead:.2f} s\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
