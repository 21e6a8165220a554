"""Site profiles: bundled ones load, user files and environment override with provenance, and
every broken profile or flag gives one clear line (file and key) with no traceback and no job."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from helpers import hpcfed, need


@pytest.fixture()
def user_env(tmp_path):
    """An isolated user: own config and state dirs (nothing of the real user leaks in)."""
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    (tmp_path / "config" / "hpcfed" / "sites").mkdir(parents=True)
    return env


def write_site(env, name, text):
    path = f"{env['XDG_CONFIG_HOME']}/hpcfed/sites/{name}.yaml"
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def test_bundled_sites_are_listed_and_valid(user_env):
    proc = hpcfed("sites", "list", "--json", env=user_env)
    assert proc.returncode == 0, proc.stderr
    names = {s["name"] for s in json.loads(proc.stdout)}
    assert {"local", "ohsu", "generic"} <= names
    for name in ("local", "ohsu", "generic"):
        proc = hpcfed("sites", "show", name, "--json", env=user_env)
        assert proc.returncode == 0, proc.stderr
    ohsu = json.loads(hpcfed("sites", "show", "ohsu", "--json", env=user_env).stdout)["profile"]
    assert ohsu["gpus"]["dialect"] == "gres" and ohsu["gpus"]["default_type"] == "a40"
    assert ohsu["time"]["max"] == 86400  # a one-day limit


def test_precedence_and_provenance(user_env):
    """flags > environment > user profile > bundled > defaults, and `sites show` says which."""
    user_file = write_site(
        user_env,
        "local",
        """
        account: mylab
        qos: normal
        time:
          default: 2h
    """,
    )
    env = dict(user_env, HPCFED_SITE__QOS="urgent", HPCFED_SITE__GPUS__MAX_PER_NODE="2")
    shown = json.loads(hpcfed("sites", "show", "local", "--json", env=env).stdout)
    prof, src = shown["profile"], shown["sources"]
    assert prof["account"] == "mylab" and src["account"] == user_file
    assert prof["qos"] == "urgent" and src["qos"] == "environment"
    assert prof["time"]["default"] == 7200 and src["time.default"] == user_file
    assert prof["time"]["max"] == 86400 and src["time.max"].endswith("site_profiles/local.yaml")
    assert src["constraint"] == "default"
    assert prof["gpus"]["max_per_node"] == 2

    # The table form shows the same sources.
    table = hpcfed("sites", "show", "local", env=env).stdout
    assert any(line.startswith("qos") and "environment" in line for line in table.splitlines())

    # The plan uses them, and a flag beats them all.
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--command",
        "true",
        "--gpus",
        "1",
        "--partition",
        "preemptable",
        "--dry-run",
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert plan["resources"]["account"] == "mylab"
    assert plan["resources"]["qos"] == "urgent"
    assert plan["resources"]["time_seconds"] == 7200
    assert plan["resources"]["partition"] == "low"  # alias from the profile's partitions
    # the environment lowered the site maximum to 2
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--command",
        "true",
        "--gpus",
        "3",
        "--dry-run",
        env=env,
    )
    assert proc.returncode == 3 and "gpus.max_per_node in environment" in proc.stderr


def test_user_site_extends_a_bundled_one(user_env):
    write_site(
        user_env,
        "mycluster",
        """
        extends: generic
        account: proj42
        partitions: {default: gpu}
    """,
    )
    proc = hpcfed(
        "submit",
        "server",
        "--site",
        "mycluster",
        "--command",
        "true",
        "--gpus",
        "2",
        "--dry-run",
        env=user_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus=2\n" in proc.stdout  # generic's dialect
    assert "#SBATCH --account=proj42\n" in proc.stdout
    assert "#SBATCH --partition=gpu\n" in proc.stdout


# (profile text, what the one-line error must name besides the file)
BROKEN_PROFILES = {
    "unknown_key": ("gpus:\n  colour: green\n", "gpus.colour: unknown key"),
    "unknown_top_key": ("acount: fedlab\n", "acount: unknown key"),
    "wrong_type": ("cpus: many\n", "cpus:"),
    "wrong_type_nested": ("scheduler:\n  ssh:\n    port: '22'\n", "scheduler.ssh.port"),
    "bad_duration": ("time:\n  default: 3 fortnights\n", "time.default: not a duration"),
    "bad_memory": ("memory: lots\n", "memory: not a memory size"),
    "bad_dialect": ("gpus:\n  dialect: gpu-per-task\n", "gpus.dialect"),
    "default_type_not_listed": (
        "gpus:\n  types: [a40]\n  default_type: h100\n",
        "gpus: default_type 'h100'",
    ),
    "bad_signal": ("preemption:\n  signal: WAKEUP\n", "preemption.signal: not a signal name"),
    "bad_directive": ("extra_directives: ['#SBATCH --mail-type=NONE']\n", "extra_directives"),
    "not_a_mapping": ("- just\n- a list\n", "must be a mapping"),
    "yaml_syntax": (
        "account: fedlab\ngpus:\n  types: [a40\n  max_per_node: 4\n",
        "YAML syntax error",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PROFILES))
def test_broken_profile_one_line_error_nothing_submitted(user_env, case):
    text, expected = BROKEN_PROFILES[case]
    path = write_site(
        user_env,
        "broken",
        "extends: local\n" + text if case not in ("not_a_mapping", "yaml_syntax") else text,
    )
    for argv in (
        ["sites", "show", "broken"],
        ["submit", "client", "--site", "broken", "--command", "true"],
    ):
        proc = hpcfed(*argv, env=user_env)
        assert proc.returncode == 3, (case, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert path in lines[0] and expected in lines[0], lines[0]
    if case == "yaml_syntax":
        assert f"{path}:4:" in lines[0] or f"{path}:3:" in lines[0]  # the line is named
    # nothing was recorded (a deployment is only recorded after a submission)
    from pathlib import Path

    assert not list(Path(user_env["XDG_STATE_HOME"]).glob("hpcfed/deployments/*.json"))


# (flags, exit code, text the one-line error must contain)
BAD_FLAGS = {
    "too_many_gpus": (["--gpus", "8"], 3, "--gpus 8: above the maximum of 4 per node"),
    "negative_gpus": (["--gpus", "-1"], 3, "--gpus -1"),
    "unknown_gpu_type": (
        ["--gpus", "1", "--gpu-type", "h100"],
        3,
        "--gpu-type h100: unknown GPU type",
    ),
    "time_above_max": (["--time", "3d"], 3, "above the maximum 1d"),
    "bad_time": (["--time", "soon"], 3, "--time soon: not a duration"),
    "bad_name": (["--name", "my client"], 3, "--name 'my client'"),
    "unknown_framework": (["--framework", "nope"], 3, "--framework nope: unknown framework"),
    "unknown_site": (["--site", "atlantis"], 8, "unknown site 'atlantis'"),
    "missing_kit": (["--no-command"], 8, "--kit: no nvflare client kit installed for site local"),
    "kit_not_there": (["--no-command", "--kit", "/nonexistent/kit"], 8, "--kit /nonexistent/kit"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_one_line_error(user_env, case):
    flags, code, expected = BAD_FLAGS[case]
    argv = ["submit", "client", "--site", "local"]
    if "--no-command" in flags:
        flags = [f for f in flags if f != "--no-command"]
    else:
        argv += ["--command", "true"]
    if "--site" in flags:
        argv = ["submit", "client"] + flags + ["--command", "true"]
    else:
        argv += flags
    proc = hpcfed(*argv, env=user_env)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_unknown_role_lists_the_known_ones(user_env):
    proc = hpcfed("submit", "admin", "--site", "local", "--command", "true", env=user_env)
    assert proc.returncode == 3
    # the roles of every framework are listed (nvflare: client, server; flower: ...)
    assert "role 'admin': not a role of nvflare (known: " in proc.stderr
    assert "nvflare: client, server" in proc.stderr


def test_every_command_has_help_with_an_example():
    for argv in (
        ["submit"],
        ["status"],
        ["logs"],
        ["cancel"],
        ["sites"],
        ["sites", "show"],
        ["doctor"],
        ["job"],
        ["job", "run"],
        ["rejoin"],
        ["cron"],
        ["cron", "install"],
        ["cron", "show"],
        ["cron", "remove"],
        ["sites", "list"],
    ):
        proc = hpcfed(*argv, "--help")
        assert proc.returncode == 0, (argv, proc.stderr)
        assert "Example:" in proc.stdout and "hpcfed " in proc.stdout.split("Example:")[1]


def test_unreadable_config_directory_is_one_clear_line(tmp_path):
    """A config directory the user cannot enter (here: root's private pytest dir as another
    user) is named, not a traceback."""
    users = [u for u in ("hpcuser", "nobody") if _exists(u)]
    need(
        os.geteuid() == 0 and bool(users),
        "needs root and another user to make a directory unreadable for",
    )
    os.chmod(tmp_path, 0o700)
    proc = hpcfed(
        "sites", "show", "local", user=users[0], env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot read" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _exists(user):
    import pwd

    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False
