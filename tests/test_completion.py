"""Shell completion: `hpcfed completion bash|zsh|fish` loaded into the real shells completes
commands, site names (bundled and the user's own) and the user's deployment names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import HPCFED, need, run

from hpcfed.state import Deployment, DeploymentStore

BIN = os.path.dirname(HPCFED[0])


@pytest.fixture
def user_things(tmp_path, monkeypatch):
    """A user site profile and two recorded deployments in this test's own directories."""
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sites = Path(env["XDG_CONFIG_HOME"]) / "hpcfed" / "sites"
    sites.mkdir(parents=True)
    (sites / "mycluster.yaml").write_text("extends: generic\n")
    store = DeploymentStore()
    for name in ("alpha-client", "beta-server"):
        store.put(Deployment(name, "id", "local", "client", "nvflare", plan={}))
    return env


def bash_complete(line: str, env) -> list:
    """What bash offers at the end of `line`, through the sourced completion function."""
    words = line.split(" ")
    script = (
        'eval "$(hpcfed completion bash)"\n'
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_hpcfed_completion hpcfed\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = run(["bash", "-c", script], env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completes_commands_sites_roles_and_deployments(user_things):
    assert bash_complete("hpcfed su", user_things) == ["submit"]
    assert {"status", "submit", "cancel", "logs", "completion"} <= set(
        bash_complete("hpcfed ", user_things)
    )
    roles = bash_complete("hpcfed submit ", user_things)
    assert {"client", "server", "superlink", "supernode"} <= set(roles), roles
    sites = bash_complete("hpcfed submit client --site ", user_things)
    assert {"local", "generic", "mycluster"} <= set(sites), sites
    assert bash_complete("hpcfed submit client --site my", user_things) == ["mycluster"]
    assert bash_complete("hpcfed cancel ", user_things) == ["alpha-client", "beta-server"]
    assert bash_complete("hpcfed logs b", user_things) == ["beta-server"]
    assert bash_complete("hpcfed status alpha-client ", user_things) == [
        "alpha-client",
        "beta-server",
    ]
    assert bash_complete("hpcfed doctor --site l", user_things) == ["local"]


def test_fish_completes_from_the_loaded_script(user_things):
    need(shutil.which("fish") is not None, "fish (scripts/bootstrap.d/47-shells.sh installs it)")
    proc = run(
        [
            "fish",
            "-c",
            "hpcfed completion fish | source; "
            "complete -C 'hpcfed cancel '; complete -C 'hpcfed submit client --site my'",
        ],
        env=user_things,
    )
    assert proc.returncode == 0, proc.stderr
    offered = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert offered == ["alpha-client", "beta-server", "mycluster"], proc.stdout


def test_zsh_loads_the_script_and_gets_deployment_names(user_things):
    need(shutil.which("zsh") is not None, "zsh (scripts/bootstrap.d/47-shells.sh installs it)")
    # Loading: compinit, then the script registers its completion function for hpcfed.
    proc = run(
        [
            "zsh",
            "-c",
            'autoload -Uz compinit && compinit -u && eval "$(hpcfed completion zsh)" && '
            "print -r -- ${_comps[hpcfed]}",
        ],
        env=user_things,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "_hpcfed_completion", proc.stdout
    # What that function asks hpcfed for (click's zsh protocol: type, value, help per item).
    proc = run(
        HPCFED,
        env={
            **user_things,
            "_HPCFED_COMPLETE": "zsh_complete",
            "COMP_WORDS": "hpcfed cancel ",
            "COMP_CWORD": "2",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:6] == [
        "plain",
        "alpha-client",
        "_",
        "plain",
        "beta-server",
        "_",
    ]


def test_completion_rejects_an_unknown_shell():
    proc = run(HPCFED + ["completion", "tcsh"])
    assert proc.returncode == 2 and "tcsh" in proc.stderr
