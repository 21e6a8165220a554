"""Describe the machine a benchmark ran on, for the results files."""

from __future__ import annotations

import os
import platform
import subprocess


def describe() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = dict(os.environ)
    env.setdefault(
        "SLURM_CONF", "/var/lib/hpcfed/testcluster/etc/slurm.conf"
    )  # Slurm's clients need one
    try:
        slurm = subprocess.run(
            ["sinfo", "--version"], capture_output=True, text=True, env=env
        ).stdout.strip()
    except OSError:
        slurm = ""
    return (
        f"{os.cpu_count()} vCPU ({cpu}), {mem_gib:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{slurm or 'no Slurm client'}"
    )
