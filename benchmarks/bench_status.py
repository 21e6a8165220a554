"""`hpcfed status` of 1,000 deployments, each with a job of its own.

Run as root with the test cluster up: python benchmarks/bench_status.py [--deployments 1000]
Writes benchmarks/results/status.md.

Set-up: N deployments submitted through the real CLI, each its own held job (`--hold`: they stay
PENDING and use no node), so N distinct jobs are in Slurm's queue — never N records sharing a
few jobs. Compared, on the same N jobs, in one run:
  1. `hpcfed status --json` over all N deployments (one CLI process; hpcfed asks the scheduler
     once for all of them),
  2. the per-job alternative a hand-written script does: N `squeue -j ID` processes,
  3. the floor: one `squeue` process listing the same N jobs by id.
What is held equal: the same jobs, the same slurmctld, the same machine, runs interleaved.
Every job is cancelled at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import describe  # noqa: E402
from benchmarks.stats import MIN_RUNS, TABLE_HEAD, once, row  # noqa: E402

HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
SLURM_CONF = "/var/lib/hpcfed/testcluster/etc/slurm.conf"


def submit_held(env: dict, i: int) -> str:
    proc = subprocess.run(
        HPCFED
        + ["submit", "client", "--site", "local", "--gpus", "0"]
        + ["--name", f"bench-status-{i}", "--command", "true", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"submit {i} failed: {proc.stderr.strip()}")
    return str(json.loads(proc.stdout)["job_id"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deployments", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=MIN_RUNS)
    args = ap.parse_args()
    n = args.deployments
    state = tempfile.mkdtemp(prefix="hpcfed-bench-status-")
    env = dict(
        os.environ,
        SLURM_CONF=SLURM_CONF,
        XDG_STATE_HOME=state,
        XDG_CONFIG_HOME=state,
        HPCFED_SITE__EXTRA_DIRECTIVES='["--hold"]',
    )
    print(f"submitting {n} held jobs through hpcfed submit ...", flush=True)
    with ThreadPoolExecutor(4) as pool:
        job_ids = list(pool.map(lambda i: submit_held(env, i), range(n)))
    assert len(set(job_ids)) == n, "every deployment must have a job of its own"
    try:
        status_cli, per_job, one_squeue = [], [], []
        calls = None
        for _ in range(max(args.runs, MIN_RUNS)):  # interleaved: each run measures all three
            status_cli.append(once(lambda: _status(env)))
            per_job.append(
                once(
                    lambda: [
                        subprocess.run(
                            ["squeue", "--noheader", "-j", j], env=env, capture_output=True
                        )
                        for j in job_ids
                    ]
                )
            )
            one_squeue.append(
                once(
                    lambda: subprocess.run(
                        ["squeue", "--noheader", "-j", ",".join(job_ids)],
                        env=env,
                        capture_output=True,
                    )
                )
            )
        calls = json.loads(_status(env).stdout).get("scheduler_calls")
    finally:
        for i in range(0, n, 200):
            subprocess.run(["scancel"] + job_ids[i : i + 200], env=env, capture_output=True)
    out = Path(__file__).resolve().parent / "results" / "status.md"
    out.write_text(
        f"# `hpcfed status` of {n} deployments, {n} distinct jobs\n\n"
        f"Measured {datetime.date.today()} on: {describe()}\n\n"
        f"{__doc__.split('Set-up:', 1)[1].strip()}\n\n"
        f"Seconds for all {n} deployments:\n\n{TABLE_HEAD}\n"
        + "\n".join(
            [
                row(f"`hpcfed status --json` ({calls} scheduler call(s))", status_cli),
                row(f"{n} × `squeue -j ID`", per_job),
                row("1 × `squeue -j ID,ID,...` (the floor)", one_squeue),
            ]
        )
        + "\n"
    )
    print(out.read_text())


def _status(env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(HPCFED + ["status", "--json"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hpcfed status failed: {proc.stderr.strip()}")
    return proc


if __name__ == "__main__":
    main()
