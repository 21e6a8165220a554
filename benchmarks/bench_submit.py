"""Submit and status speed on the local test cluster: hpcfed (CLI and Python API) vs plain
`sbatch` vs submitit, one job at a time, as a user submits.

Run as root with the test cluster up: python benchmarks/bench_submit.py [--runs 7] [--tracked 1000]
Measures, each --runs times, interleaved round-robin so all sides see the same machine load:
  1. one submit: `sbatch --wrap` (a process), `hpcfed submit` (a process: Python start-up and the
     imports the command needs), the API's `Site.submit()` in a warm Python process, submitit's
     `executor.submit()` in a warm process;
  2. one status: `squeue -j` vs `hpcfed status NAME` (a process);
  3. `hpcfed status` with --tracked deployments: scheduler calls and wall time;
  4. `hpcfed --help` cold start.
Jobs are submitted held (--hold) and cancelled afterwards, so the cluster stays free for others.
Targets (issue 17): CLI <= sbatch + 100 ms, API <= sbatch + 10 ms (medians).
Writes benchmarks/results/submit.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import describe  # noqa: E402

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = str(Path(sys.executable).with_name("hpcfed"))
SLURM_CONF = "/var/lib/hpcfed/testcluster/etc/slurm.conf"
SBATCH = ["sbatch", "--parsable", "--hold", "--account=fedlab", "--partition=debug"]


def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its waited-for children."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CPU: dict = {}  # side -> CPU seconds per run (robust where wall time is not: a loaded machine)


def timed(fn, side=None):
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if side:
        CPU.setdefault(side, []).append(cpu)
    return wall, out


def cancel(job_ids):
    ids = sorted({j for j in job_ids if j})
    for i in range(0, len(ids), 200):
        subprocess.run(["scancel"] + ids[i : i + 200], capture_output=True)


def sbatch_once(i: int) -> str:
    argv = SBATCH + ["--output=/dev/null", "--job-name", f"bench-sbatch-{i}", "--wrap", "true"]
    p = subprocess.run(argv, capture_output=True, text=True, check=True)
    return p.stdout.strip()


def cli_once(i: int, env) -> str:
    argv = [HPCFED, "submit", "client", "--site", "local", "--gpus", "0"]
    argv += ["--name", f"bench-cli-{i}", "--command", "true", "--json"]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)["job_id"]


class ApiSide:
    """A warm Python process's view: hpcfed imported and the Site loaded once, as in a notebook."""

    def __init__(self):
        import hpcfed

        self.site = hpcfed.Site("local")

    def once(self, i: int) -> str:
        dep = self.site.submit("client", gpus=0, name=f"bench-api-{i}", command="true")
        assert dep.job_id is not None
        return dep.job_id


def _noop():
    return 0


class SubmititSide:
    def __init__(self, folder: str):
        import submitit

        self.ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        self.ex.update_parameters(
            timeout_min=60,
            slurm_partition="debug",
            slurm_additional_parameters={"hold": True, "account": "fedlab"},
        )

    def once(self, i: int) -> str:
        return self.ex.submit(_noop).job_id


def stats(samples):
    ms = [s * 1000 for s in samples]
    return statistics.median(ms), min(ms), max(ms)


def seed_status(m: int, job_ids):
    """M deployment records pointing at real (held) jobs, for one `hpcfed status` over all."""
    from hpcfed.state import Deployment, DeploymentStore

    store = DeploymentStore()
    template = store.require("bench-cli-0")
    for i in range(m):
        store.put(
            Deployment(
                name=f"bench-status-{i}",
                deployment_id=f"s{i}",
                site="local",
                role="client",
                framework="nvflare",
                plan=template.plan,
                jobs=[{"job_id": job_ids[i % len(job_ids)], "submitted_at": ""}],
            )
        )
    return [f"bench-status-{i}" for i in range(m)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tracked", type=int, default=1000)
    args = ap.parse_args()
    runs = max(5, args.runs)
    tmp = tempfile.mkdtemp(prefix="hpcfed-bench-")
    env = {
        "SLURM_CONF": SLURM_CONF,
        "XDG_STATE_HOME": f"{tmp}/state",
        "XDG_CONFIG_HOME": f"{tmp}/cfg",
        "XDG_DATA_HOME": f"{tmp}/data",
        "HPCFED_SITE__EXTRA_DIRECTIVES": '["--hold"]',
        "HPCFED_SITE__WORKDIR": f"{tmp}/work",
    }
    os.environ.update(env)  # the API and submitit run in this process
    env = dict(os.environ)

    load_before = os.getloadavg()[0]
    samples: dict = {k: [] for k in ("sbatch", "cli", "api", "submitit", "squeue", "status")}
    ids: list = []
    try:
        api, sub = ApiSide(), SubmititSide(f"{tmp}/submitit")
        ids += [api.once(-1), sub.once(-1)]  # warm-up: first-call caches (templates, schemas)
        for i in range(runs):
            for key, fn in (
                ("sbatch", lambda i=i: sbatch_once(i)),
                ("cli", lambda i=i: cli_once(i, env)),
                ("api", lambda i=i: api.once(i)),
                ("submitit", lambda i=i: sub.once(i)),
            ):
                dt, job_id = timed(fn, key)
                samples[key].append(dt)
                ids.append(job_id)
        for _ in range(runs):
            dt, _ = timed(
                lambda: subprocess.run(
                    ["squeue", "--noheader", "-j", ids[2]], capture_output=True, check=True
                ),
                "squeue",
            )
            samples["squeue"].append(dt)
            dt, p = timed(
                lambda: subprocess.run(
                    [HPCFED, "status", "bench-cli-0", "--json"], env=env, capture_output=True
                ),
                "status",
            )
            assert p.returncode == 0, p.stderr
            samples["status"].append(dt)
        names = seed_status(args.tracked, ids[:50])
        many, calls = [], None
        for _ in range(5):
            dt, p = timed(
                lambda: subprocess.run(
                    [HPCFED, "status", "--json"] + names, env=env, capture_output=True, text=True
                )
            )
            many.append(dt)
            calls = json.loads(p.stdout)["scheduler_calls"]
    finally:
        cancel(ids)
    helps = []
    for _ in range(runs):
        dt, _ = timed(
            lambda: subprocess.run([HPCFED, "--help"], capture_output=True, check=True), "help"
        )
        helps.append(dt)

    sb, cli, apim, subm = (stats(samples[k]) for k in ("sbatch", "cli", "api", "submitit"))
    sq, st = stats(samples["squeue"]), stats(samples["status"])

    def row(what, s, base=None, side=None, base_side=None):
        over = f"{s[0] - base[0]:+.0f}" if base else ""
        cpu = statistics.median(CPU[side]) * 1000
        cpu_over = f" ({cpu - statistics.median(CPU[base_side]) * 1000:+.0f})" if base_side else ""
        return f"| {what} | {s[0]:.0f} | {s[1]:.0f}–{s[2]:.0f} | {over} | {cpu:.0f}{cpu_over} |"

    def verdict(over_ms, limit):
        return f"{'met' if over_ms <= limit else 'not met'} ({over_ms:+.0f} ms)"

    def cpu_over(side):
        return (statistics.median(CPU[side]) - statistics.median(CPU["sbatch"])) * 1000

    out = Path(__file__).resolve().parent / "results" / "submit.md"
    lines = [
        "# Submitting and polling: hpcfed (CLI and API) vs sbatch vs submitit",
        "",
        f"Measured {datetime.date.today()} on: {describe()}",
        "",
        "Local test cluster (`hpcfed testcluster`, slurmctld on the same 2-core machine, shared "
        "with other work while this ran). Jobs submitted held and cancelled afterwards. "
        f"Each side {runs} runs, interleaved. Run: `python benchmarks/bench_submit.py`. "
        f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: wall "
        "times above ~2 load per core are mostly waiting for a CPU; see the CPU column.",
        "",
        "## One submit",
        "",
        "| how | median ms | min–max ms | vs sbatch ms | CPU ms (vs sbatch) |",
        "|---|---|---|---|---|",
        row("`sbatch --parsable --hold --wrap true` (a process)", sb, side="sbatch"),
        row("`hpcfed submit client --site local ... --json` (a process)", cli, sb, "cli", "sbatch"),
        row("`hpcfed.Site('local').submit(...)` (warm Python process)", apim, sb, "api", "sbatch"),
        row("submitit `executor.submit(f)` (warm Python process)", subm, sb, "submitit", "sbatch"),
        "",
        f"Targets, wall-time medians: CLI ≤ sbatch + 100 ms: **{verdict(cli[0] - sb[0], 100)}**; "
        f"API ≤ sbatch + 10 ms: **{verdict(apim[0] - sb[0], 10)}**. In CPU time: CLI "
        f"**{verdict(cpu_over('cli'), 100)}**, API **{verdict(cpu_over('api'), 10)}**.",
        "",
        "## One status",
        "",
        "| how | median ms | min–max ms | vs squeue ms | CPU ms (vs squeue) |",
        "|---|---|---|---|---|",
        row("`squeue --noheader -j ID` (a process)", sq, side="squeue"),
        row("`hpcfed status NAME --json` (a process)", st, sq, "status", "squeue"),
        "",
        f"## `hpcfed status` with {args.tracked} tracked deployments",
        "",
        "| scheduler calls | median s | min–max s |",
        "|---|---|---|",
        f"| {calls} | {statistics.median(many):.2f} | {min(many):.2f}–{max(many):.2f} |",
        "",
        "## Cold start",
        "",
        "| command | median ms | min–max ms | CPU ms |",
        "|---|---|---|---|",
        "| `hpcfed --help` | {:.0f} | {:.0f}–{:.0f} | ".format(*stats(helps))
        + f"{statistics.median(CPU['help']) * 1000:.0f} |",
        "",
        "CPU ms: user + system time of the process (for the API and submitit rows: of the Python",
        "process and the sbatch it runs), median; it does not grow with the machine's load the way",
        "wall time does, so it shows what each side costs when the machine is shared.",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
