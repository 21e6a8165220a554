"""What every benchmark reports: the median and the min–max of at least five runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

MIN_RUNS = 5


def once(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of fn."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat(fn: Callable[[], object], runs: int = MIN_RUNS) -> list:
    """Wall seconds of `runs` calls of fn (at least MIN_RUNS)."""
    out = []
    for _ in range(max(runs, MIN_RUNS)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(values: Sequence[float], unit: str = "s", digits: int = 3) -> str:
    """'median X unit (min A – max B, n runs)'."""
    v = sorted(values)
    return (
        f"median {statistics.median(v):.{digits}f} {unit} "
        f"(min {v[0]:.{digits}f} – max {v[-1]:.{digits}f}, {len(v)} runs)"
    )


def row(label: str, values: Sequence[float], digits: int = 3) -> str:
    """A markdown table row: | label | median | min | max | runs |."""
    v = sorted(values)
    return (
        f"| {label} | {statistics.median(v):.{digits}f} | {v[0]:.{digits}f} | "
        f"{v[-1]:.{digits}f} | {len(v)} |"
    )


TABLE_HEAD = "| what | median | min | max | runs |\n|---|---|---|---|---|"
