"""How long `hpcfed testcluster up` takes from installed packages to all nodes idle.

Run as root: python benchmarks/bench_testcluster.py [--runs 5]
It stops the running test cluster first and leaves it running at the end.
Writes benchmarks/results/testcluster.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import describe  # noqa: E402

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    wall, reported = [], []
    for _ in range(args.runs):
        subprocess.run(HPCFED + ["testcluster", "down"], check=True, capture_output=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            HPCFED + ["testcluster", "up", "--json"], check=True, capture_output=True, text=True
        )
        wall.append(time.monotonic() - t0)
        reported.append(json.loads(proc.stdout)["seconds"])
    t0 = time.monotonic()
    subprocess.run(HPCFED + ["testcluster", "up"], check=True, capture_output=True)
    idempotent = time.monotonic() - t0
    out = Path(__file__).resolve().parent / "results" / "testcluster.md"
    out.write_text(
        "# `hpcfed testcluster up`: packages installed → all nodes idle\n\n"
        f"Measured {datetime.date.today()} on: {describe()}\n\n"
        "Each run: `testcluster down`, then `testcluster up` (munge, MariaDB, slurmdbd with "
        "association checks, slurmctld, 3 slurmd, wait for all nodes idle).\n\n"
        "| runs | median wall s | min | max | second `up` (already running) s |\n|---|---|---|---|---|\n"
        f"| {args.runs} | {statistics.median(wall):.2f} | {min(wall):.2f} | {max(wall):.2f} "
        f"| {idempotent:.2f} |\n\n"
        f"Raw wall times (s): {', '.join(f'{w:.2f}' for w in wall)}\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
