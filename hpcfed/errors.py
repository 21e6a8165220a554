"""The one table of exit codes, and the errors a user can act on (each with its code).

Every command raises one of these errors for bad input or a failed action; the CLI prints its
message as one line (no traceback) and exits with its code. The in-job supervisor (`hpcfed job
run`) ends the Slurm job with a code from the same table, so `sacct` and `hpcfed status` read
the same numbers as a script calling the CLI. Codes are part of the interface: scripts and cron
entries branch on them, so never renumber. Every code is at most 255: a process's exit status
is taken mod 256 (a framework's own 305 would show as 49), which is why a framework's codes are
mapped onto this table and only named in the job's log.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional


class ExitCode(IntEnum):
    """Exit codes of the CLI and of the job; each member's docstring says when it is used.

    A job whose role exits by itself ends with the role's own exit status (0-255, 128+N when a
    signal N killed it): that number is the role's, not one of these.
    """

    # (value, docstring): the docstring is the member's own, shown by help(ExitCode.X).
    def __new__(cls, value: int, doc: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    OK = 0, "Success."
    FAILED = 1, "The action failed; the message says why."
    USAGE = 2, "Bad command-line usage (click's own code)."
    CONFIG = 3, "Bad configuration or input (profile, flag value, plan): nothing was submitted."
    SCHEDULER_UNREACHABLE = 4, "The scheduler did not answer: state unknown, never 'job gone'."
    SUBMIT_REJECTED = 5, "The scheduler answered and refused the job."
    KIT = 6, "A startup kit or other credentials, or the dashboard, failed a check."
    ENVIRONMENT = 7, "Something is missing on this machine (package, binary, root, free port)."
    NOT_FOUND = 8, "A named thing (site, deployment, kit, image) does not exist."
    TUNNEL = 9, "The tunnel could not come up (e.g. no UDP egress to the hub) or lost its hub."
    PREFLIGHT = 10, "GPU preflight failed in the job: the role was not started."
    ROLE_FAILED = 11, "The role could not start, or failed in a way its framework reported."
    ROLE_REFUSED = 12, "The framework refused the role (e.g. a SuperNode key not registered)."
    INTERNAL = 70, "A bug in hpcfed (EX_SOFTWARE); HPCFED_DEBUG=1 shows the traceback."
    INTERRUPTED = 130, "Interrupted by the user (Ctrl-C, 128 + SIGINT)."
    STOPPED = 143, "The job was told to stop (128 + SIGTERM) before its role started."

    def __str__(self) -> str:  # "3", not "ExitCode.CONFIG", on every Python (3.11 changed it)
        return str(int(self))

    @property
    def label(self) -> str:
        """The member's name as roles.yaml and logs spell it: `role-refused`."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Optional[ExitCode]:
        """The member whose label is `label`, or None."""
        return next((c for c in cls if c.label == label), None)


def signal_exit(signum: int) -> int:
    """A process killed by signal `signum`, reported the shell's way (128 + N)."""
    return 128 + signum


class HpcfedError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code: int = ExitCode.FAILED


class ConfigError(HpcfedError):
    """Bad input: a malformed profile, an unknown key, an impossible flag value."""

    exit_code = ExitCode.CONFIG


class SchedulerUnavailable(HpcfedError):
    """The scheduler did not answer: state is unknown, nothing may be concluded from it."""

    exit_code = ExitCode.SCHEDULER_UNREACHABLE


class SubmitRejected(HpcfedError):
    """The scheduler answered and refused the job (its message is in ours)."""

    exit_code = ExitCode.SUBMIT_REJECTED


class KitError(HpcfedError):
    """A startup kit, or the dashboard that hands it out, failed a check."""

    exit_code = ExitCode.KIT


class EnvironmentProblem(HpcfedError):
    """The machine lacks something: a package, a binary, root, a free port."""

    exit_code = ExitCode.ENVIRONMENT


class NotFound(HpcfedError):
    """A named thing (site, deployment, kit, image) does not exist."""

    exit_code = ExitCode.NOT_FOUND


class TunnelError(HpcfedError):
    """The userspace WireGuard tunnel could not come up or lost its hub."""

    exit_code = ExitCode.TUNNEL


class GpuPreflightFailed(HpcfedError):
    """The GPUs Slurm assigned are missing, unhealthy or busy: the job must not start the role."""

    exit_code = ExitCode.PREFLIGHT
