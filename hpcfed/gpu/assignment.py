"""Which GPUs Slurm assigned to this job, read from the environment it set.

Slurm exports SLURM_JOB_GPUS (SLURM_STEP_GPUS in a step): its own gres indices on the node, and
CUDA_VISIBLE_DEVICES: what CUDA should enumerate. With cgroup device constraints the latter is
renumbered from 0 while the former keeps the node's numbering, so the two are never assumed equal.
"""

from __future__ import annotations

from typing import Mapping, Optional

VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
    "SLURM_GPUS_ON_NODE",
    "GPU_DEVICE_ORDINAL",
    "CUDA_DEVICE_ORDER",
)
_NONE = ("", "NoDevFiles", "-1")  # Slurm writes NoDevFiles when a gres has no device file


def _split(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    value = value.strip()
    if value in _NONE:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def read_assignment(env: Mapping[str, str]) -> dict:
    """What the environment says about the job's GPUs (JSON-able).

    count: how many GPUs the job has (None: the environment says nothing, e.g. a login node);
    cuda: the CUDA_VISIBLE_DEVICES entries (indices or GPU-/MIG- UUIDs);
    slurm: Slurm's gres indices on the node (SLURM_STEP_GPUS, else SLURM_JOB_GPUS).
    """
    cuda = _split(env.get("CUDA_VISIBLE_DEVICES"))
    slurm_var = "SLURM_STEP_GPUS" if "SLURM_STEP_GPUS" in env else "SLURM_JOB_GPUS"
    slurm = _split(env.get(slurm_var))
    count: Optional[int] = None
    source = None
    if cuda is not None:
        count, source = len(cuda), "CUDA_VISIBLE_DEVICES"
    elif slurm is not None:
        count, source = len(slurm), slurm_var
    elif env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        count, source = int(env["SLURM_GPUS_ON_NODE"]), "SLURM_GPUS_ON_NODE"
    return {
        "count": count,
        "source": source,
        "cuda": cuda,
        "slurm": slurm,
        "slurm_variable": slurm_var if slurm is not None else None,
        "variables": {k: env[k] for k in VARIABLES if k in env},
    }
