"""The cron entry `hpcfed cron install --crontab` writes runs rejoin on the user's own
deployments: cron starts it with almost no environment (so the XDG directories must be in the
entry) and turns an unescaped % into a newline (so a % must be escaped)."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import HPCFED, need, run

from hpcfed.state.store import Deployment, DeploymentStore

OTHER = "hpcuser"  # a real non-root user with a crontab (scripts/bootstrap)


def cron_command(line: str) -> str:
    """What cron gives `sh -c` for a crontab line (crontab(5)): the sixth field up to the first
    unescaped %, with each \\% turned into %."""
    command = re.split(r"\s+", line.strip(), maxsplit=5)[5]
    out, i = [], 0
    while i < len(command):
        if command[i] == "\\" and command[i + 1 : i + 2] == "%":
            out.append("%")
            i += 2
            continue
        if command[i] == "%":
            break
        out.append(command[i])
        i += 1
    return "".join(out)


@pytest.fixture()
def user_dirs():
    need(os.geteuid() == 0, "needs root to act as a second user")
    need(shutil.which("crontab") is not None, "crontab not installed (46-cron.sh)")
    try:
        pw = pwd.getpwnam(OTHER)
    except KeyError:
        need(False, f"user {OTHER} missing (scripts/bootstrap)")
        raise
    top = Path(tempfile.mkdtemp(prefix="hpcfed-cron-", dir="/tmp"))
    os.chmod(top, 0o755)
    base = top / "my 100%"  # a % (and a space) in every XDG directory
    env = {
        var: str(base / var.lower())
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
    }
    # A deployment the user stopped: rejoin reads it and leaves it alone (no scheduler call).
    store = DeploymentStore(Path(env["XDG_STATE_HOME"]) / "hpcfed" / "deployments")
    store.put(Deployment("kept", "d1", "local", "client", "nvflare", plan={}, stopped=True))
    subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(top)], check=True)
    before = run(["crontab", "-l"], user=OTHER).stdout
    yield pw, env
    if before.strip():
        run(["crontab", "-"], user=OTHER, input=before)
    else:
        run(["crontab", "-r"], user=OTHER)
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.timeout(120)
def test_the_crontab_entry_runs_rejoin_on_the_users_deployments(user_dirs):
    pw, env = user_dirs
    # The installing shell's PATH goes into the entry (cron's is /usr/bin:/bin; the jobs rejoin
    # submits take the submitter's PATH): here with a site directory that has a space in it.
    path = f"/opt/site tools/bin:{os.environ['PATH']}"
    env = dict(env, PATH=path)
    proc = run(HPCFED + ["cron", "install", "--crontab", "--every", "10m"], env=env, user=OTHER)
    assert proc.returncode == 0, proc.stderr
    table = run(["crontab", "-l"], user=OTHER).stdout
    lines = [line for line in table.splitlines() if "rejoin --log-file" in line]
    assert len(lines) == 1, table
    assert f" PATH={shlex.quote(path)} " in lines[0], lines[0]
    # Run the entry as cron would: its command, through sh, with cron's minimal environment.
    cron_env = ["env", "-i", f"HOME={pw.pw_dir}", f"LOGNAME={OTHER}", "SHELL=/bin/sh",
                "PATH=/usr/bin:/bin"]  # fmt: skip
    proc = run(cron_env + ["/bin/sh", "-c", cron_command(lines[0])], user=OTHER)
    assert proc.returncode == 0, (cron_command(lines[0]), proc.stderr)
    log = Path(env["XDG_STATE_HOME"]) / "hpcfed" / "rejoin.log"
    # the login node that ran it is named: cron may run on several sharing this log
    assert f" {os.uname().nodename} rejoin pass: 1 deployments" in log.read_text()


def test_scrontab_refuses_a_percent_it_might_not_keep(monkeypatch, tmp_path):
    from hpcfed.errors import ConfigError
    from hpcfed.rejoin import cron

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a%b"))
    with pytest.raises(ConfigError, match="cannot be written into a scrontab entry"):
        cron.block("scrontab", "10m", str(tmp_path / "a%b" / "log"), [])
    line = cron.block("crontab", "10m", str(tmp_path / "log"), [])[-1]
    assert f"XDG_STATE_HOME={tmp_path}/a\\%b " in line
