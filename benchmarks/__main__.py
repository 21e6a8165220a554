"""Run every benchmark (or the ones named): `make bench`, `make bench BENCH="status tunnel"`.

Each benchmark is benchmarks/bench_NAME.py, run as its own process with this interpreter (the
hpcfed venv), one after the other so they never share the machine; each writes
benchmarks/results/NAME.md. Needs root and a machine where `make test` has run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list:
    return sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))


def main(argv: list) -> int:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(
            f"benchmarks: no benchmark {', '.join(unknown)} (have: {', '.join(available())})",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names:
        print(f"== benchmark {name}", flush=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / f"bench_{name}.py")], cwd=HERE.parent)
        took = time.monotonic() - t0
        print(f"== benchmark {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {took:.0f} s")
        if code != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
