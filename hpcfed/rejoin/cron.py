"""The periodic `hpcfed rejoin` entry in scrontab (preferred: Slurm runs it once cluster-wide,
no login-node crontab) or the user's crontab. Installing replaces our own block, so it is
idempotent; other entries are kept as they are."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from typing import List, Optional, Tuple

from hpcfed import paths
from hpcfed.errors import ConfigError, EnvironmentProblem
from hpcfed.paths import hpcfed_command

MARK = "# hpcfed-rejoin: managed by `hpcfed cron`; remove with `hpcfed cron remove`"
_EVERY_RE = re.compile(r"^(\d+)\s*([mh])$")


def schedule(every: str) -> str:
    """`10m` -> `*/10 * * * *`, `2h` -> `0 */2 * * *`."""
    m = _EVERY_RE.match(every.strip().lower())
    if not m:
        raise ConfigError(f"--every {every}: use minutes or hours, e.g. 10m or 1h")
    n, unit = int(m.group(1)), m.group(2)
    # Every 1 is `*`, not `*/1`: Slurm's scrontab rejects a step of 1 ("bad step value").
    if unit == "m" and 1 <= n <= 59:
        return f"{_every(n)} * * * *"
    if unit == "m" and n % 60 == 0:
        n, unit = n // 60, "h"
    if unit == "h" and 1 <= n <= 23:
        return f"0 {_every(n)} * * *"
    raise ConfigError(f"--every {every}: between 1m and 23h (minutes below 60, or whole hours)")


def _every(n: int) -> str:
    return "*" if n == 1 else f"*/{n}"


def hpcfed_argv() -> List[str]:
    """How cron should call this very hpcfed (cron's PATH is minimal): an absolute path."""
    return hpcfed_command()


# What the entry must carry, because cron starts it with almost no environment: the directories
# hpcfed keeps its files in (else rejoin would look for the user's deployments in the default
# places), and the installing shell's PATH. Cron's PATH is /usr/bin:/bin: on clusters sbatch is
# often elsewhere, and a job takes the PATH of whoever submits it (--export), so a role that
# rejoin resubmitted from cron could not find apptainer in /usr/local/bin (seen on the Docker
# cluster: the client exited "No such file or directory: 'apptainer'").
def entry_environment() -> List[Tuple[str, str]]:
    """(variable, value) the entry sets: each XDG base this invocation resolves, and PATH."""
    return [
        ("XDG_CONFIG_HOME", os.path.abspath(paths.config_dir().parent)),
        ("XDG_DATA_HOME", os.path.abspath(paths.data_dir().parent)),
        ("XDG_STATE_HOME", os.path.abspath(paths.state_dir().parent)),
        ("PATH", os.environ.get("PATH") or os.defpath),
    ]


def _word(kind: str, text: str) -> str:
    r"""One shell word of the entry, written so that the (s)crontab line means exactly it.

    crontab(5) turns an unescaped % into a newline (the rest becomes stdin) and `\%` into %;
    whether scrontab does the same is not documented, so a % is refused there, and a backslash
    (whose handling differs between cron implementations) in both.
    """
    if "\\" in text or "\n" in text or (kind == "scrontab" and "%" in text):
        bad = "a backslash or newline" if kind == "crontab" else "a %, backslash or newline"
        raise ConfigError(
            f"{text!r}: {bad} cannot be written into a {kind} entry safely; "
            "use a path without it" + (" or --crontab" if "%" in text else "")
        )
    word = shlex.quote(text)
    return word.replace("%", "\\%") if kind == "crontab" else word


def block(kind: str, every: str, log_file: str, scron_options: List[str]) -> List[str]:
    argv = hpcfed_argv() + ["rejoin", "--log-file", log_file]
    env = [f"{var}={_word(kind, value)}" for var, value in entry_environment()]
    cmd = " ".join(env + [_word(kind, a) for a in argv])
    lines = [MARK]
    if kind == "scrontab":
        lines.append("#SCRON " + " ".join(["--job-name=hpcfed-rejoin", "--time=5"] + scron_options))
    lines.append(f"{schedule(every)} {cmd}")
    return lines


def strip(text: str) -> List[str]:
    """The table without our block (the mark line, #SCRON lines after it, and the entry)."""
    out, skipping = [], False
    for line in text.splitlines():
        if line == MARK:
            skipping = True
            continue
        if skipping:
            if line.startswith("#SCRON"):
                continue
            skipping = False
            continue  # the entry line itself
        out.append(line)
    return out


def ours(text: str) -> List[str]:
    lines, keep = [], False
    for line in text.splitlines():
        if line == MARK:
            keep = True
        if keep:
            lines.append(line)
            if not line.startswith("#"):
                keep = False
    return lines


def pick(kind: Optional[str]) -> str:
    if kind:
        if not shutil.which(kind):
            raise EnvironmentProblem(f"--{kind}: `{kind}` is not installed here")
        return kind
    if shutil.which("scrontab"):
        return "scrontab"
    if shutil.which("crontab"):
        return "crontab"
    raise EnvironmentProblem("neither scrontab nor crontab is installed here")


def read(kind: str) -> str:
    res = subprocess.run([kind, "-l"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip()
        if "no crontab" in err.lower() or "no scrontab" in err.lower() or not err:
            return ""
        raise EnvironmentProblem(f"{kind} -l: {err.splitlines()[-1]}")
    return res.stdout


def write(kind: str, lines: List[str]) -> None:
    text = "\n".join(lines).strip("\n") + "\n" if any(l.strip() for l in lines) else ""
    if kind == "crontab" and not text:
        subprocess.run(["crontab", "-r"], capture_output=True, timeout=60)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".cron", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        res = subprocess.run([kind, path], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    if res.returncode != 0:
        raise EnvironmentProblem(f"{kind}: {(res.stderr or res.stdout).strip()}")
