"""The site profile schema: every key a profile may have, its type and default.

Validation is hpcfed.model's (extra keys forbidden, values taken only as written: strict=True);
hpcfed.profiles.loader turns its errors into one line naming the file and the key path.
"""

from __future__ import annotations

import re
from typing import Dict, List, Literal, Optional

from hpcfed.model import Field, Model, field_validator, model_validator
from hpcfed.profiles.units import parse_duration, parse_memory_mb
from hpcfed.scheduler.target import SchedulerTarget, SshTarget

_SIGNAL_RE = re.compile(r"(SIG)?(USR1|USR2|TERM|INT|HUP|QUIT|ALRM|CONT|URG)\Z")
# One sbatch option value: sbatch splits `#SBATCH` lines on white space, so a space would start
# another option (`--partition=debug --account=other`).
_WORD_RE = re.compile(r"[^\s\x00-\x1f\x7f]+\Z")
# A command the job runs exactly as written: `exec 'VALUE'` in the batch script, argv[0] in the
# supervisor. Nothing expands it, so `$HOME/...` or `~/...` would be looked up literally.
_COMMAND_RE = re.compile(r"(/[^\s$`~\\'\"]*|[A-Za-z0-9_.+-][^\s/$`~\\'\"]*)\Z")


def one_word(value: str) -> str:
    """An sbatch option value: one word, no white space or control characters."""
    if not _WORD_RE.match(value):
        raise ValueError(
            f"{value!r} must be one word (sbatch would read what follows a space as another option)"
        )
    return value


def command_word(value: str) -> str:
    """A command the job executes as written: a name looked up on PATH, or an absolute path."""
    if not _COMMAND_RE.match(value):
        raise ValueError(
            f"{value!r}: the job runs this as written, without a shell ($, ~ and spaces are not "
            "expanded); give a command name on the job's PATH or an absolute path"
        )
    return value


def apptainer_bind(value: str) -> str:
    """A bind spec apptainer accepts (the parser the job uses, run now)."""
    from hpcfed.container.apptainer import bind_spec
    from hpcfed.errors import ConfigError

    try:
        return bind_spec(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class _Strict(Model, strict=True):
    pass


class SshSettings(SshTarget, strict=True):
    """scheduler.ssh: the fields and defaults are the plan's (hpcfed.scheduler.target)."""


class SchedulerSettings(SchedulerTarget, strict=True):
    """scheduler: the fields and defaults are the plan's (hpcfed.scheduler.target)."""

    ssh: SshSettings = SshSettings()

    @model_validator(mode="after")
    def _ssh_needs_a_host(self) -> SchedulerSettings:
        if self.connect == "ssh" and not self.ssh.host:
            raise ValueError("scheduler.connect is ssh but scheduler.ssh.host is not set")
        return self


class GpuSettings(_Strict):
    dialect: Literal["gres", "gpus", "gpus-per-node"] = "gres"
    types: List[str] = []  # GPU types the site has (typed gres); empty = untyped only
    default_type: Optional[str] = None  # type asked for when --gpu-type is not given
    max_per_node: int = Field(default=8, ge=0)
    cpus_per_gpu: Optional[int] = Field(default=None, ge=1)
    mem_per_gpu: Optional[int] = None  # MB

    @field_validator("mem_per_gpu", mode="before")
    @classmethod
    def _mem(cls, v: object) -> Optional[int]:
        return None if v is None else parse_memory_mb(v)

    @field_validator("types")
    @classmethod
    def _types(cls, v: List[str]) -> List[str]:
        for t in v:
            if "," in one_word(t) or ":" in t:
                raise ValueError(f"GPU type {t!r}: no ',' or ':' (it goes into gpu:TYPE:N)")
        return v

    @model_validator(mode="after")
    def _default_type_known(self) -> GpuSettings:
        if self.default_type is not None and self.default_type not in self.types:
            raise ValueError(f"default_type {self.default_type!r} is not one of types {self.types}")
        return self


class TimeSettings(_Strict):
    default: int = 3600  # seconds
    max: Optional[int] = None

    @field_validator("default", "max", mode="before")
    @classmethod
    def _dur(cls, v: object) -> Optional[int]:
        return None if v is None else parse_duration(v)


class ApptainerSettings(_Strict):
    binary: str = "apptainer"
    binds: List[str] = []
    gpu_flag: Optional[Literal["nv", "rocm"]] = "nv"
    image_dir: Optional[str] = (
        None  # where `hpcfed image build` stores SIFs; None = data dir/images
    )

    @field_validator("binary")
    @classmethod
    def _binary(cls, v: str) -> str:
        return command_word(v)

    @field_validator("binds")
    @classmethod
    def _binds(cls, v: List[str]) -> List[str]:
        return [apptainer_bind(b) for b in v]


class _Values(Model):
    """A section as a plan stores it: the values a job runs with (durations in seconds), checked
    against these fields without the profile's parsing (a stored 90 is 90 s, not 90 min)."""


class Preemption(_Values):
    """What the job asks Slurm for before its time ends, and how the role is stopped."""

    requeue: bool = True
    signal: str = "USR2"  # asked for with --signal=B:SIG@lead_time (USR1 clashes with NCCL)
    lead_time: int = 90  # seconds before the end
    grace: int = 20  # seconds the role gets between its graceful stop and KILL


class PreemptionSettings(Preemption, strict=True):
    """`preemption:` as a profile writes it (durations like `90s`, signal names like SIGUSR2)."""

    @field_validator("lead_time", "grace", mode="before")
    @classmethod
    def _dur(cls, v: object) -> int:
        return parse_duration(v)

    @field_validator("signal")
    @classmethod
    def _sig(cls, v: str) -> str:
        m = _SIGNAL_RE.match(v.upper())
        if not m:
            raise ValueError(f"not a signal name: {v!r} (e.g. USR2, TERM)")
        return m.group(2)


class Rejoin(_Values):
    """How `hpcfed rejoin` brings a lost deployment back: backoff between resubmissions of one
    deployment, and a cap on how many in a window (then it waits for the user)."""

    backoff: int = 30  # seconds after the first resubmission; doubles each time
    max_backoff: int = 1800
    max_resubmits: int = Field(default=5, ge=1)
    window: int = 6 * 3600


class RejoinSettings(Rejoin, strict=True):
    """`rejoin:` as a profile writes it (durations like `30m`)."""

    @field_validator("backoff", "max_backoff", "window", mode="before")
    @classmethod
    def _dur(cls, v: object) -> int:
        return parse_duration(v)


class PreflightOptions(_Values):
    """How the job's GPU preflight check judges the node (it runs for jobs with GPUs)."""

    allow_without_nvml: bool = False
    min_memory_mib: Optional[int] = Field(default=None, ge=0)


class PreflightSettings(PreflightOptions, strict=True):
    """`preflight:` as a profile writes it."""


class SiteProfile(_Strict):
    description: str = ""
    extends: Optional[str] = None  # a user profile may start from another site
    scheduler: SchedulerSettings = SchedulerSettings()
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    reservation: Optional[str] = None
    partitions: Dict[str, str] = {}  # "default" and/or one per role
    gpus: GpuSettings = GpuSettings()
    cpus: int = Field(default=1, ge=1)  # CPUs for a job without GPUs (and the minimum)
    memory: int = 2048  # MB for a job without GPUs (and the minimum)
    time: TimeSettings = TimeSettings()
    setup: List[str] = []  # shell lines run first in the job (module load ...)
    apptainer: ApptainerSettings = ApptainerSettings()
    workdir: str = "~/hpcfed"  # one subdirectory per deployment; `~` is the cluster home
    preemption: PreemptionSettings = PreemptionSettings()
    preflight: PreflightSettings = PreflightSettings()
    rejoin: RejoinSettings = RejoinSettings()
    extra_directives: List[str] = []  # verbatim sbatch options, e.g. "--mail-type=NONE"
    hpcfed_command: str = "hpcfed"  # how a job calls hpcfed on the compute node

    @field_validator("memory", mode="before")
    @classmethod
    def _mem(cls, v: object) -> int:
        return parse_memory_mb(v)

    @field_validator("account", "qos", "constraint", "reservation")
    @classmethod
    def _word(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else one_word(v)

    @field_validator("partitions")
    @classmethod
    def _partitions(cls, v: Dict[str, str]) -> Dict[str, str]:
        for part in v.values():
            one_word(part)
        return v

    @field_validator("hpcfed_command")
    @classmethod
    def _hpcfed_command(cls, v: str) -> str:
        return command_word(v)

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, v: List[str]) -> List[str]:
        for d in v:
            if not d.startswith("--") or "\n" in d:
                raise ValueError(f"not an sbatch option: {d!r} (write e.g. --mail-type=NONE)")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: List[str]) -> List[str]:
        for line in v:
            if "\n" in line:
                raise ValueError("one shell line per list item")
        return v
