"""Durations and memory sizes as users write them in profiles and flags, and as Slurm wants them."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNITS_RE = re.compile(r"(?:(\d+)\s*([smhdw]))+\Z")
_UNIT_PART_RE = re.compile(r"(\d+)\s*([smhdw])")
# Slurm's own forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z")


def parse_duration(value: object) -> int:
    """Seconds from `90s`, `30m`, `1h30m`, `2d`, Slurm's `1-00:00:00`/`HH:MM:SS`, or a bare
    integer (minutes, as in sbatch --time). Raises ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"not a positive duration: {value!r}")
        return value * 60
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r}")
    text = value.strip().lower()
    if _UNITS_RE.match(text):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _UNIT_PART_RE.findall(text))
    else:
        m = _SLURM_RE.match(text)
        if not m:
            raise ValueError(
                f"not a duration: {value!r} (use e.g. 90s, 30m, 2h, 1d or Slurm's D-HH:MM:SS)"
            )
        seconds = _slurm_seconds(*m.groups())
    if seconds <= 0:
        raise ValueError(f"not a positive duration: {value!r}")
    return seconds


def _slurm_seconds(days: str | None, first: str, second: str | None, third: str | None) -> int:
    """Seconds of Slurm's D-HH[:MM[:SS]], HH:MM:SS, MM:SS or MM (the groups of _SLURM_RE)."""
    a = int(first)
    b = int(second) if second is not None else None
    c = int(third) if third is not None else None
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is not None and c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM


def slurm_time(seconds: int) -> str:
    """Seconds as Slurm's D-HH:MM:SS (rounded up to a whole second)."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def human_duration(seconds: int) -> str:
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"


_MEM_RE = re.compile(r"(\d+)\s*([kmgt]?)i?b?\Z")
_MEM_MB = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_memory_mb(value: object) -> int:
    """Megabytes from `500M`, `4G`, `4GiB`, or a bare integer (MB, as in sbatch --mem)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"not a positive memory size: {value!r}")
        return value
    if isinstance(value, str):
        m = _MEM_RE.match(value.strip().lower())
        if m:
            mb = int(int(m.group(1)) * _MEM_MB[m.group(2)])
            if mb > 0:
                return mb
    raise ValueError(f"not a memory size: {value!r} (use e.g. 512M or 4G)")
