"""How long `hpcfed kit pull` and `hpcfed kit verify` take against a real NVFlare dashboard.

Run: python benchmarks/bench_kit.py [--runs 10]   (needs the nvflare extra and `zip`)
Starts a dashboard on loopback (tests/nvflare_dashboard.py), pulls the client kit of one site
repeatedly into a throw-away data directory, and times:
  - the whole CLI (`hpcfed kit pull`, including Python start-up),
  - in-process: the dashboard's kit build + download, and the checks alone (verify_kit),
  - the whole CLI `hpcfed kit verify`.
Writes benchmarks/results/kit.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from nvflare_dashboard import start_dashboard  # noqa: E402

from benchmarks.machine import describe  # noqa: E402

# The installed command: `python -m hpcfed` would import a source tree in the working directory.
HPCFED = [os.path.join(os.path.dirname(sys.executable), "hpcfed")]
EMAIL = "bench@orga.test"


def stats(values) -> str:
    values = sorted(values)
    return (
        f"median {statistics.median(values):.3f} s, min {values[0]:.3f} s, max {values[-1]:.3f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="hpcfed-bench-kit-")
    os.environ["XDG_DATA_HOME"] = data
    from hpcfed.kit.checks import verify_kit
    from hpcfed.kit.dashboard import Dashboard, new_pin

    dash = start_dashboard()
    try:
        dash.setup_project("benchfed")
        dash.add_user(EMAIL, "orga")
        dash.add_site(EMAIL, "site-1", gpus=2)
        dash.freeze()
        env = dict(os.environ, HPCFED_DASHBOARD_PASSWORD=dash.users[EMAIL])
        pull_cli, verify_cli, download, checks = [], [], [], []
        path = None
        for _ in range(args.runs):
            t0 = time.monotonic()
            proc = subprocess.run(
                HPCFED
                + [
                    "kit",
                    "pull",
                    "--insecure-http",
                    "--dashboard",
                    dash.url,
                    "--user",
                    EMAIL,
                    "--site",
                    "site-1",
                    "--json",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            pull_cli.append(time.monotonic() - t0)
            assert proc.returncode == 0, proc.stderr
            path = proc.stdout.split('"path": "')[1].split('"')[0]
            t0 = time.monotonic()
            proc = subprocess.run(
                HPCFED + ["kit", "verify", path, "--site", "site-1"],
                env=env,
                capture_output=True,
                text=True,
            )
            verify_cli.append(time.monotonic() - t0)
            assert proc.returncode == 0, proc.stdout + proc.stderr

        client = Dashboard(dash.url, insecure_http=True)
        login = client.login(EMAIL, dash.users[EMAIL])
        site = client.find_site(login, "site-1")
        for _ in range(args.runs):
            t0 = time.monotonic()
            client.download(login, "client", new_pin(), site=site)
            download.append(time.monotonic() - t0)
            t0 = time.monotonic()
            assert verify_kit(path, expected_name="site-1").ok
            checks.append(time.monotonic() - t0)
    finally:
        dash.stop()
        shutil.rmtree(data, ignore_errors=True)

    out = ROOT / "benchmarks" / "results" / "kit.md"
    out.parent.mkdir(exist_ok=True)
    import nvflare

    out.write_text(
        f"# kit pull + verify\n\n"
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
        f"`python benchmarks/bench_kit.py --runs {args.runs}` against a real NVFlare {nvflare.__version__} "
        f"dashboard (gunicorn, 1 worker) on loopback.\n\n"
        f"Machine: {describe()}\n\n"
        f"| step | time |\n|---|---|\n"
        f"| `hpcfed kit pull` (whole CLI: login, site lookup, kit build+download, unpack, checks, pin, install) | {stats(pull_cli)} |\n"
        f"| dashboard builds and sends the client kit (one POST /clients/<id>/blob) | {stats(download)} |\n"
        f"| checks alone (`verify_kit`: chain, key, name, expiry, signatures) | {stats(checks)} |\n"
        f"| `hpcfed kit verify` (whole CLI, incl. Python start-up) | {stats(verify_cli)} |\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
