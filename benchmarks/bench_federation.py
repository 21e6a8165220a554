"""The federation as users feel it: hpcfed (Slurm + Apptainer + tunnel) vs NVFlare run directly.

Run as root from the repository: python benchmarks/bench_federation.py [--rounds 5] [--runs 5]
Needs what `make demo` needs (it uses the demo's code). Writes benchmarks/results/federation.md
and, when matplotlib is installed (the `bench` extra), benchmarks/results/federation.png.

Measured:
- submit → first round finished (roles submitted as Slurm jobs, images started, tunnels up,
  clients registered, training job submitted through the admin kit, round 0 done);
- time per round: the same NVFlare job (numpy ScatterAndGather, 2 clients) run by hpcfed, and
  run directly on loopback from an `nvflare poc` project (no Slurm, containers or tunnel);
- a preempted client back in the federation (preemption → client registered with the server);
- bytes through the hub during the training job, from the hub's own wg counters.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # demo/ only: hpcfed itself comes from the installed package
from benchmarks.machine import describe  # noqa: E402
from benchmarks.stats import MIN_RUNS  # noqa: E402
from demo.federation import nvflare_time as _ts  # noqa: E402
from demo.federation import round_times  # noqa: E402

REGISTERED_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Successfully registered client"
)


def job_with_rounds(rounds: int, dest: Path) -> Path:
    job = dest / "hello-numpy"
    shutil.copytree(REPO / "demo" / "jobs" / "hello-numpy", job)
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    cfg["workflows"][0]["args"]["num_rounds"] = rounds
    server.write_text(json.dumps(cfg))
    os.chmod(dest, 0o755)
    return job


# ------------------------------------------------------------------ NVFlare directly on loopback
def direct_loopback(rounds: int) -> dict:
    """The same job, NVFlare's own processes on loopback (nvflare poc project)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    work = Path(tempfile.mkdtemp(prefix="bench-poc-"))
    env = dict(os.environ, NVFLARE_POC_WORKSPACE=str(work))
    subprocess.run(
        [str(Path(sys.executable).parent / "nvflare"), "poc", "prepare", "-n", "2", "--force"],
        env=env,
        check=True,
        capture_output=True,
    )
    prod = work / "example_project" / "prod_00"
    procs = []
    try:
        for part in ("server", "site-1", "site-2"):
            log = open(work / f"{part}.log", "w")
            # sub_start.sh runs the `python3` on PATH: this venv's, which has nvflare.
            venv_env = dict(env, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
            procs.append(
                subprocess.Popen(
                    ["bash", "startup/sub_start.sh", "--once"],
                    cwd=prod / part,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=venv_env,
                )
            )
        sess = new_secure_session("admin@nvidia.com", str(prod / "admin@nvidia.com"), timeout=60)
        try:
            while len(sess.get_system_info().client_info) < 2:
                time.sleep(1)
            job_id = sess.submit_job(str(job_with_rounds(rounds, work)))
            while not (sess.get_job_meta(job_id).get("status") or "").startswith("FINISHED"):
                time.sleep(1)
            status = sess.get_job_meta(job_id)["status"]
        finally:
            sess.close()
        log = (work / "server.log").read_text(errors="replace")
        log += "".join(p.read_text(errors="replace") for p in (prod / "server").rglob("log.txt"))
        return {"status": status, "rounds": round_times(log)}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ through hpcfed
def through_hpcfed(rounds: int) -> dict:
    from demo import federation as demo

    demo.Federation().down()  # the demo's own folders start empty
    fed = demo.Federation(demo.State())
    out: dict = {}
    try:
        fed.prepare()
        t_submit = time.time()
        fed.launch()
        out["submit_to_running_s"] = time.time() - t_submit
        before = fed.hub_traffic()
        tmp = Path(tempfile.mkdtemp(prefix="bench-fed-"))
        t_train = time.time()
        result = fed.run_training(timeout=900, job_src=job_with_rounds(rounds, tmp))
        t_done = time.time()
        after = fed.hub_traffic()
        server_log = demo.hpcfed("logs", "demo-server").stdout
        rt = round_times(server_log)
        out.update(status=result.get("status"), rounds=rt)
        if rt:
            out["submit_to_first_round_s"] = rt[min(rt)][1] - t_submit
        moved = sum(after[p].get("rx_bytes", 0) - before[p].get("rx_bytes", 0) for p in after)
        out["hub_bytes_during_training"] = moved
        out["hub_mbit_s_during_training"] = moved * 8 / 1e6 / max(1e-9, t_done - t_train)

        # A preempted client back in the federation (idle federation, no job running).
        victim = "demo-hospital-a"
        node = demo.hpcfed_json("status", victim)["deployments"][0]["node"]
        t_pre = time.time()
        demo.sh(
            [
                "sbatch",
                "--parsable",
                "-p",
                "high",
                "-w",
                node,
                "--gres=gpu:a40:4",
                "--chdir=/tmp",
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 1",
            ],
            env={"SLURM_CONF": "/var/lib/hpcfed/testcluster/etc/slurm.conf"},
        )
        deadline = time.time() + 300
        back = None
        while time.time() < deadline and back is None:
            time.sleep(1)
            for line in demo.hpcfed("logs", victim).stdout.splitlines():
                m = REGISTERED_RE.match(line)
                if m and _ts(m.group(1)) > t_pre:
                    back = _ts(m.group(1))
        out["preempted_client_back_s"] = back - t_pre if back else None
        return out
    finally:
        fed.down()


def per_round(rt: dict) -> list:
    return [f - s for s, f in (rt[r] for r in sorted(rt))]


def _cell(values: list, digits: int = 1) -> str:
    """median (min–max) over the runs that measured it."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return "–"
    return f"{statistics.median(v):.{digits}f} ({v[0]:.{digits}f}–{v[-1]:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=MIN_RUNS)
    args = ap.parse_args()
    runs = max(args.runs, MIN_RUNS)
    directs, feds = [], []
    for i in range(runs):  # interleaved, so both sides see the same machine
        print(f"run {i + 1}/{runs}", flush=True)
        directs.append(direct_loopback(args.rounds))
        feds.append(through_hpcfed(args.rounds))
    d_round = [statistics.median(per_round(d["rounds"])) for d in directs]
    h_round = [statistics.median(per_round(f["rounds"])) for f in feds]
    overhead = [h - d for h, d in zip(h_round, d_round)]

    def col(key: str) -> list:
        return [f.get(key) for f in feds]

    lines = [
        "# A whole federation: hpcfed vs NVFlare directly on loopback",
        "",
        f"Measured {dt.date.today()} on: {describe()}",
        "",
        f"Job: demo/jobs/hello-numpy (numpy ScatterAndGather, 2 clients, NPTrainer sleeping 2 s a "
        f"round), {args.rounds} rounds. hpcfed: server and two clients as Slurm jobs on the local "
        "test cluster, each in its Apptainer image, meeting through the userspace tunnel and a "
        "wireguard-go hub; the training job submitted through the admin kit from inside the image. "
        "Direct: the same job on an `nvflare poc` project, processes on loopback. Held equal: the "
        "job, NVFlare's version, the machine; the two sides run interleaved, "
        f"{runs} runs each. Cells: median (min–max) over the runs.",
        "",
        "| measure | hpcfed | direct |",
        "|---|---|---|",
        f"| runs | {runs} | {runs} |",
        f"| job status | {', '.join(sorted(set(str(f.get('status')) for f in feds)))} "
        f"| {', '.join(sorted(set(str(d.get('status')) for d in directs)))} |",
        f"| median time per round (s) | {_cell(h_round, 2)} | {_cell(d_round, 2)} |",
        f"| per-round overhead (s) | {_cell(overhead, 2)} | – |",
        f"| submit → all roles running (s) | {_cell(col('submit_to_running_s'))} | – |",
        f"| submit → first round finished (s) | {_cell(col('submit_to_first_round_s'))} | – |",
        f"| preempted client registered again (s) | {_cell(col('preempted_client_back_s'))} | – |",
        f"| bytes through the hub during training | {_cell(col('hub_bytes_during_training'), 0)} | – |",
        "",
        "The model here is a 3x3 array: the hub's byte count shows the protocol's chatter, not "
        "the tunnel's capacity (see tunnel.md for bulk throughput).",
    ]
    out = REPO / "benchmarks" / "results" / "federation.md"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, runs + 1), h_round, "o-", label="hpcfed (Slurm + Apptainer + tunnel)")
        ax.plot(range(1, runs + 1), d_round, "s-", label="NVFlare directly on loopback")
        ax.set_xticks(range(1, runs + 1))
        ax.set_xlabel("run")
        ax.set_ylabel("median seconds per round")
        ax.set_ylim(bottom=0)
        ax.set_title("Time per federated round")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        lines += ["", "![time per round](federation.png)"]
    except ImportError:
        lines += ["", "(matplotlib not installed: no plot)"]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
