"""Errors a user can act on, each with its own exit code.

Every command raises one of these for bad input or a failed action; the CLI prints its message
as one line (no traceback) and exits with its code. Codes are part of the interface: scripts and
cron entries branch on them, so never renumber.
"""


class HpcfedError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = 1


class ConfigError(HpcfedError):
    """Bad input: a malformed profile, an unknown key, an impossible flag value."""

    exit_code = 3


class SchedulerUnavailable(HpcfedError):
    """The scheduler did not answer: state is unknown, nothing may be concluded from it."""

    exit_code = 4


class SubmitRejected(HpcfedError):
    """The scheduler answered and refused the job (its message is in ours)."""

    exit_code = 5


class KitError(HpcfedError):
    """A startup kit, or the dashboard that hands it out, failed a check."""

    exit_code = 6


class EnvironmentProblem(HpcfedError):
    """The machine lacks something: a package, a binary, root, a free port."""

    exit_code = 7


class NotFound(HpcfedError):
    """A named thing (site, deployment, kit, image) does not exist."""

    exit_code = 8


class TunnelError(HpcfedError):
    """The userspace WireGuard tunnel could not come up or lost its hub."""

    exit_code = 9


class GpuPreflightFailed(HpcfedError):
    """The GPUs Slurm assigned are missing, unhealthy or busy: the job must not start the role."""

    exit_code = 10


# Exit codes used outside exceptions.
EXIT_OK = 0
EXIT_USAGE = 2  # click's own code for bad usage
EXIT_INTERNAL = 70  # a bug in hpcfed (EX_SOFTWARE); the message says how to get the traceback
EXIT_INTERRUPTED = 130
