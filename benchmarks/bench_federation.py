"""The federation as users feel it: hpcfed (Slurm + Apptainer + tunnel) vs NVFlare run directly.

Run as root from the repository: python benchmarks/bench_federation.py [--rounds 5]
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

ROUND_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Round (\d+) (started|finished)\.")
REGISTERED_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Successfully registered client"
)


def _ts(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_times(log: str) -> dict:
    """round -> (started, finished) epoch seconds, from an NVFlare server log."""
    rounds: dict = {}
    for line in log.splitlines():
        m = ROUND_RE.match(line)
        if m:
            rounds.setdefault(int(m.group(2)), {})[m.group(3)] = _ts(m.group(1))
    return {r: (v["started"], v["finished"]) for r, v in rounds.items() if len(v) == 2}


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

    if demo.STATE_DIR.exists():
        demo.Federation().down()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    direct = direct_loopback(args.rounds)
    fed = through_hpcfed(args.rounds)
    d_rounds, h_rounds = per_round(direct["rounds"]), per_round(fed["rounds"])
    lines = [
        "# A whole federation: hpcfed vs NVFlare directly on loopback",
        "",
        f"Measured {dt.date.today()} on: {describe()}",
        "",
        f"Job: demo/jobs/hello-numpy (numpy ScatterAndGather, 2 clients, NPTrainer sleeping 2 s a "
        f"round), {args.rounds} rounds. hpcfed: server and two clients as Slurm jobs on the local "
        "test cluster, each in its Apptainer image, meeting through the userspace tunnel and a "
        "wireguard-go hub; the training job submitted through the admin kit from inside the image. "
        "Direct: the same job on an `nvflare poc` project, processes on loopback.",
        "",
        "| measure | hpcfed | direct |",
        "|---|---|---|",
        f"| job status | {fed.get('status')} | {direct.get('status')} |",
        f"| median time per round (s) | {statistics.median(h_rounds):.2f} | {statistics.median(d_rounds):.2f} |",
        f"| per-round overhead (s) | {statistics.median(h_rounds) - statistics.median(d_rounds):+.2f} | – |",
        f"| submit → all roles running (s) | {fed.get('submit_to_running_s', float('nan')):.1f} | – |",
        f"| submit → first round finished (s) | {fed.get('submit_to_first_round_s', float('nan')):.1f} | – |",
        f"| preempted client registered again (s) | {fed.get('preempted_client_back_s') or float('nan'):.1f} | – |",
        f"| bytes through the hub during training | {fed.get('hub_bytes_during_training', 0):,} | – |",
        f"| mean hub rate during training (Mbit/s) | {fed.get('hub_mbit_s_during_training', 0):.3f} | – |",
        "",
        f"Rounds (s), hpcfed: {', '.join(f'{x:.2f}' for x in h_rounds)}",
        f"Rounds (s), direct: {', '.join(f'{x:.2f}' for x in d_rounds)}",
        "",
        "The model here is a 3x3 array: the tunnel rate during training shows the protocol's "
        "chatter, not the tunnel's capacity (see tunnel.md for bulk throughput).",
    ]
    out = REPO / "benchmarks" / "results" / "federation.md"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(h_rounds)), h_rounds, "o-", label="hpcfed (Slurm + Apptainer + tunnel)")
        ax.plot(range(len(d_rounds)), d_rounds, "s-", label="NVFlare directly on loopback")
        ax.set_xticks(range(max(len(h_rounds), len(d_rounds))))
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
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
