"""The one validator for every name hpcfed turns into a file name, a job name or a config line.

Site, deployment, hub peer and kit/federation names all end up in paths (`sites/NAME.yaml`,
`deployments/NAME.json`, `kits/FED/ROLE/SITE/`), in `#SBATCH` lines and in WireGuard configs, so
each is checked here before it is used: no slash, no `..`, no newline (the pattern is anchored
with `\\Z`; `$` would let a trailing newline through), and a length a file system accepts.
"""

from __future__ import annotations

import re

from hpcfed.errors import ConfigError

MAX_LENGTH = 63  # also what Slurm job names and DNS labels accept
# Letters, digits, '.', '_', '-'; the first character alphanumeric (no hidden files, no '-x'
# taken for an option).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Kit labels may also be an admin's e-mail address (`admin@lab.org`, `me+test@lab.org`).
_LABEL = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*\Z")
LABEL_MAX_LENGTH = 128


def _shown(value: str) -> str:
    """The value as it appears in an error: quoted, escapes visible, never pages long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"...' ({len(value)} characters)"


def check_name(kind: str, value: object, *, email: bool = False) -> str:
    """`value` if it is a valid `kind` name (e.g. "site", "--name"), else ConfigError (exit 3).

    email=True also accepts '@' and '+' and up to 128 characters (kit labels of admin kits).
    """
    pattern, limit = (_LABEL, LABEL_MAX_LENGTH) if email else (_NAME, MAX_LENGTH)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{kind} {value!r}: a name is required")
    if len(value) > limit:
        raise ConfigError(f"{kind} {_shown(value)}: longer than {limit} characters")
    if not pattern.match(value):
        extra = " @ +" if email else ""
        raise ConfigError(
            f"{kind} {_shown(value)}: not a valid name (letters, digits, . _ -{extra}; "
            "starting with a letter or digit; no slashes, spaces or newlines)"
        )
    return value
