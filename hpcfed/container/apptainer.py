"""How a role runs inside its Apptainer image in the job: the `apptainer exec` argv, built purely.

Inside the container:
  /fl/kit        the startup kit, read-only (certificates and keys: the role must not change them)
  /fl/workspace  the role's writable workspace and working directory (logs, state, checkpoints)
  /etc/hosts     optionally a generated hosts file, so the federation's server name resolves to
                 where the tunnel delivers it

`--containall` keeps the user's home, /tmp, PIDs and IPC of the host out, and `--cleanenv`
drops the host environment: the role sees only what is passed as `APPTAINERENV_*`, which is the
role's own variables plus the GPU selection and job identity Slurm gave the job.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Mapping, Optional

from hpcfed.errors import ConfigError, EnvironmentProblem

KIT_MOUNT = "/fl/kit"
WORKSPACE_MOUNT = "/fl/workspace"

# GPU selection a job receives from Slurm (and ROCm's equivalents); passed through explicitly
# because --cleanenv drops them. Never assume CUDA_VISIBLE_DEVICES == SLURM_JOB_GPUS.
GPU_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "GPU_DEVICE_ORDINAL",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPUS_ON_NODE",
)
# Who the role is running as, so its logs can name the job and count restarts.
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_CPUS_ON_NODE")

GPU_FLAGS = {"nv": "--nv", "--nv": "--nv", "rocm": "--rocm", "--rocm": "--rocm"}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def bind_path(path: str, what: str) -> str:
    # apptainer splits --bind specs on ',' and ':'; such a path cannot be bound as given.
    if not path or "," in path or ":" in path:
        raise ConfigError(
            f"{what} {path!r}: a bind path must be non-empty and contain no ',' or ':'"
        )
    return path


def bind_spec(spec: str) -> str:
    parts = spec.split(":")
    if not spec or "," in spec or len(parts) > 3 or not all(parts[:2]):
        raise ConfigError(f"bind {spec!r}: expected SRC[:DST[:ro|rw]] without ','")
    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
        raise ConfigError(f"bind {spec!r}: the option must be 'ro' or 'rw', not {parts[2]!r}")
    return spec


def passthrough_env(job_env: Mapping[str, str]) -> dict[str, str]:
    """The GPU selection and job identity variables present in `job_env`."""
    return {k: job_env[k] for k in GPU_VARIABLES + JOB_VARIABLES if k in job_env}


def exec_argv(
    *,
    apptainer: str,
    image: str,
    command: list[str],
    gpu_flag: Optional[str],
    binds: list[str],
    kit_dir: Optional[str],
    workspace: str,
    env: dict[str, str],
    hosts_file: Optional[str],
    job_env: Optional[Mapping[str, str]] = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv that runs `command` in `image`, and the variables to add to apptainer's environment.

    gpu_flag: "nv"/"--nv", "rocm"/"--rocm" or None (no GPU libraries bound in).
    binds: extra SRC[:DST[:ro|rw]] from the site profile.
    env: the role's own variables (secrets are fine here: they travel in the environment, never argv).
    job_env: where the job's GPU variables are read from; os.environ when None (the only
    non-pure default — pass it explicitly to keep the call pure).
    Returns (argv, env_additions); env_additions holds only APPTAINERENV_* names.
    """
    if not command:
        raise ConfigError("container command: the role's entry command is empty")
    argv = [apptainer, "exec"]
    if gpu_flag:
        flag = GPU_FLAGS.get(gpu_flag)
        if flag is None:
            raise ConfigError(f"gpu flag {gpu_flag!r}: expected 'nv' or 'rocm'")
        argv.append(flag)
    argv += ["--cleanenv", "--containall", "--pwd", WORKSPACE_MOUNT]
    for spec in binds:
        argv += ["--bind", bind_spec(spec)]
    if kit_dir:
        argv += ["--bind", f"{bind_path(kit_dir, 'kit dir')}:{KIT_MOUNT}:ro"]
    argv += ["--bind", f"{bind_path(workspace, 'workspace')}:{WORKSPACE_MOUNT}"]
    if hosts_file:
        argv += ["--bind", f"{bind_path(hosts_file, 'hosts file')}:/etc/hosts:ro"]
    argv.append(image)
    argv += list(command)

    passed = passthrough_env(os.environ if job_env is None else job_env)
    passed.update(env)  # the role's own values win over the job's
    additions = {}
    for name, value in passed.items():
        if not _ENV_NAME.match(name):
            raise ConfigError(f"container env: {name!r} is not a valid variable name")
        additions[f"APPTAINERENV_{name}"] = str(value)
    return argv, additions


def find_apptainer(explicit: Optional[str] = None) -> str:
    """The apptainer (or singularity) binary to use, or EnvironmentProblem saying what to do."""
    for name in [explicit] if explicit else ["apptainer", "singularity"]:
        path = shutil.which(name)
        if path:
            return path
    raise EnvironmentProblem(
        f"{explicit or 'apptainer'} not found on PATH: this node has no Apptainer (login nodes often "
        "lack it). Build on a node that has it, e.g. `srun --pty hpcfed image build ...` on a compute "
        "node, or build elsewhere and copy the SIF into the site's image directory"
    )
