"""Flower as users feel it: hpcfed (Slurm + Apptainer + tunnel through a hub) vs the same Flower
processes on bare loopback.

Run as root from the repository: python benchmarks/bench_flower.py [--runs 5] [--rounds 3]
Needs what `make demo FRAMEWORK=flower` needs (it uses the demo's code). Writes
benchmarks/results/flower.md.

Measured, both sides interleaved run by run:
- hpcfed: submit of the SuperLink -> first round finished (SuperLink job, key registration through
  the operator's tunnel, two SuperNode jobs online, `flwr run` of the shipped app);
- time per round of the shipped app (2 SuperNodes, FedAvg over 4 numpy weights, round-seconds 0):
  hpcfed's federation vs `flower-superlink` + 2 `flower-supernode` started with `apptainer exec`
  from the same images on loopback (same TLS and node authentication; no Slurm, no tunnel, no
  supervisor). Round boundaries are when `flwr run --stream` printed "[ROUND k/N]" lines, so
  both sides carry the same log-streaming granularity.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
from benchmarks.machine import describe  # noqa: E402
from benchmarks.stats import MIN_RUNS, row  # noqa: E402
from demo import flower as demo  # noqa: E402
from demo.federation import HPCFED  # noqa: E402


def round_durations(stamped) -> list:
    """Seconds per round from (time, line) pairs of `flwr run --stream` output."""
    marks = [t for t, line in stamped if "[ROUND " in line]
    end = [t for t, line in stamped if "Strategy execution finished" in line]
    marks += end[:1]
    return [b - a for a, b in zip(marks, marks[1:])]


def hpcfed_side(rounds: int) -> dict:
    if demo.STATE_DIR.exists() or demo.demo_root().exists():
        demo.FlowerFederation().down()
    fed = demo.FlowerFederation(demo.State())
    try:
        fed.prepare()
        fed.launch()
        stamped = []
        result, _, out = fed.run_app(
            rounds=rounds, on_line=lambda l: stamped.append((time.time(), l))
        )
        if result.get("weights") != [float(rounds)] * 4:
            raise RuntimeError(f"hpcfed run failed: {out[-2000:]}")
        first = [t for t, line in stamped if "[ROUND 2/" in line or "Strategy execution" in line]
        return {
            "submit_to_first_round": first[0] - fed.state.timeline["submit"],
            "rounds": round_durations(stamped),
        }
    finally:
        fed.down()


def _start(argv, log):
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def loopback_side(rounds: int, images: dict) -> dict:
    """The same images and app, Flower's processes directly on loopback."""
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    env = {f"XDG_{k}_HOME": str(work / k.lower()) for k in ("CONFIG", "DATA", "STATE")}
    procs = []

    def hp(*args):
        return subprocess.run(
            HPCFED + list(args), env=dict(os.environ, **env), capture_output=True, text=True,
            check=True,
        )  # fmt: skip

    try:
        hp("kit", "flower", "ca", "--federation", "bench", "--server-name", "fl-server")
        fed = work / "data" / "hpcfed" / "flower" / "bench"
        hosts = work / "hosts"
        hosts.write_text("127.0.0.1 localhost fl-server\n")
        ex = ["apptainer", "exec", "--cleanenv", "--containall", "--bind", f"{hosts}:/etc/hosts:ro"]
        offline = ["--env", "FLWR_TELEMETRY_ENABLED=0,FLWR_DISABLE_UPDATE_CHECK=1"]
        (work / "link").mkdir()
        log = open(work / "log", "w")
        procs.append(
            _start(
                ex
                + offline
                + [
                    "--bind",
                    f"{fed / 'superlink'}:/fl/kit:ro",
                    "--bind",
                    f"{work / 'link'}:/fl/workspace",
                    images["superlink"],
                    "flower-superlink",
                    "--ssl-ca-certfile",
                    "/fl/kit/ca.crt",
                    "--ssl-certfile",
                    "/fl/kit/server.pem",
                    "--ssl-keyfile",
                    "/fl/kit/server.key",
                    "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation",
                    "--database",
                    "/fl/workspace/superlink.db",
                    "--port",
                    "29093",
                ],
                log,
            )  # fmt: skip
        )
        console = ["--federation", "bench", "--image", images["superlink"]]
        # The console dials the federation's port: point it at this SuperLink's.
        fj = fed / "operator" / "federation.json"
        fj.write_text(fj.read_text().replace('"port": 9093', '"port": 29093'))
        deadline = time.monotonic() + 120
        while subprocess.run(
            HPCFED + ["kit", "flower", "list", *console], env=dict(os.environ, **env),
            capture_output=True,
        ).returncode:  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("loopback SuperLink did not answer")
            time.sleep(1)
        for i, site in enumerate(("a", "b")):
            hp("kit", "flower", "keygen", "--federation", "bench", "--site", site,
               "--ca", str(fed / "operator" / "ca.crt"), "--server", "fl-server:29093")  # fmt: skip
            hp("kit", "flower", "register", str(fed / "supernode" / site / "site.pub"),
               "--site", site, *console)  # fmt: skip
            procs.append(
                _start(
                    ex
                    + offline
                    + [
                        "--bind",
                        f"{fed / 'supernode' / site}:/fl/kit:ro",
                        images["supernode"],
                        "flower-supernode",
                        "--superlink",
                        "fl-server:29093",
                        "--root-certificates",
                        "/fl/kit/ca.crt",
                        "--auth-supernode-private-key",
                        "/fl/kit/site.key",
                        "--port",
                        str(29100 + i),
                    ],
                    log,
                )  # fmt: skip
            )
        stamped = []
        proc = subprocess.Popen(
            HPCFED + ["kit", "flower", "flwr", *console, "--app", str(demo.APP), "--",
                      "run", "/fl/workspace/in/app", "bench", "--stream",
                      "--run-config", f"num-server-rounds={rounds} round-seconds=0.0"],
            env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for line in proc.stdout:
            stamped.append((time.time(), line))
        proc.wait()
        if not any(f'"weights": [{float(rounds)}' in line for _, line in stamped):
            raise RuntimeError("loopback run failed: " + "".join(l for _, l in stamped)[-2000:])
        return {"rounds": round_durations(stamped)}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=MIN_RUNS)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    images = {
        r: str(demo.IMAGE_DIR / f"flower-{r}-{demo.FLOWER_VERSION}.sif")
        for r in ("superlink", "supernode")
    }
    startup, via_hpcfed, direct, failures = [], [], [], []
    load_before = os.getloadavg()[0]
    for i in range(max(args.runs, MIN_RUNS)):
        print(f"run {i + 1}: loopback", flush=True)
        direct += loopback_side(args.rounds, images)["rounds"]
        print(f"run {i + 1}: hpcfed", flush=True)
        try:
            h = hpcfed_side(args.rounds)
        except demo.DemoError as exc:  # counted and shown, never silently dropped
            failures.append(str(exc).splitlines()[0])
            print(f"  failed: {exc}", flush=True)
            continue
        startup.append(h["submit_to_first_round"])
        via_hpcfed += h["rounds"]
        print(f"  first round {h['submit_to_first_round']:.1f} s, rounds {h['rounds']}", flush=True)
    out = REPO / "benchmarks" / "results" / "flower.md"
    load = os.getloadavg()[0]
    out.write_text(
        "# Flower: hpcfed vs bare loopback\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on: {describe()}; load average (1 min) at the "
        f"start {load_before:.1f}, at the end {load:.1f}\n\n"
        f"`python benchmarks/bench_flower.py --runs {args.runs} --rounds {args.rounds}`; both sides "
        "interleaved run by run; the shipped numpy app, 2 SuperNodes, TLS and node authentication "
        "on both sides.\n\n"
        "| measure | median | min | max | runs |\n|---|---|---|---|---|\n"
        + row("hpcfed: submit → first round finished (s)", startup, 1)
        + "\n"
        + row("seconds per round, hpcfed (Slurm + Apptainer + tunnel via hub)", via_hpcfed, 2)
        + "\n"
        + row("seconds per round, bare loopback (same images)", direct, 2)
        + "\n"
        + (
            f"\nhpcfed runs that failed ({len(failures)}): " + "; ".join(failures) + "\n"
            if failures
            else ""
        )
    )
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
