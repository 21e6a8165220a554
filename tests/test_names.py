"""Every name hpcfed turns into a path, a job name or a config line goes through one validator
(hpcfed/names.py): a bad one is refused with exit 3 and one line naming it, before anything is
read, written or submitted."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from helpers import hpcfed

from hpcfed.errors import ConfigError
from hpcfed.names import check_name


@pytest.fixture()
def env(tmp_path):
    e = {
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HPCFED_HUB_DIR": str(tmp_path / "hub"),
    }
    (tmp_path / "cfg" / "hpcfed" / "sites").mkdir(parents=True)
    return e


def refused(proc, value_shown: str) -> None:
    """Exit 3, one line, naming the value, no traceback."""
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and value_shown in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "value",
    ["x\n", "../x", "a/b", "/abs", ".hidden", "-x", "a b", "", "a" * 64, "é"],
)
def test_bad_names_are_refused(value):
    with pytest.raises(ConfigError):
        check_name("site", value)


@pytest.mark.parametrize("value", ["local", "site-1", "a.b_c", "A" * 63, "0x"])
def test_good_names_pass(value):
    assert check_name("site", value) == value


def test_kit_labels_may_be_e_mail_addresses():
    assert check_name("site", "admin+x@lab.org", email=True) == "admin+x@lab.org"
    with pytest.raises(ConfigError):
        check_name("site", "admin@lab.org\n", email=True)


def test_site_name_cannot_reach_a_file_outside_the_sites_directory(env, tmp_path):
    # A YAML file two levels above the sites directory: `sites show ../../x` loaded it.
    (tmp_path / "cfg" / "x.yaml").write_text("account: stolen\n")
    refused(hpcfed("sites", "show", "../../x", env=env), "'../../x'")


def test_newline_in_a_site_name_cannot_inject_shell_lines(env, tmp_path):
    site = "evil\ntouch INJECTED"
    (tmp_path / "cfg" / "hpcfed" / "sites" / f"{site}.yaml").write_text("extends: local\n")
    proc = hpcfed(
        "submit", "client", "--site", site, "--name", "n1", "--command", "true", "--dry-run",
        env=env,
    )  # fmt: skip
    refused(proc, repr(site))
    assert "touch INJECTED" not in proc.stdout


def test_deployment_names_are_checked_on_lookup(env, tmp_path):
    # An absolute path was joined as-is: `status /abs/path` acted on a foreign JSON file.
    foreign = tmp_path / "foreign"
    foreign.write_text(json.dumps({"name": "foreign"}))
    refused(hpcfed("status", str(foreign), env=env), repr(str(foreign)))
    refused(hpcfed("cancel", "a/b", env=env), "'a/b'")
    refused(hpcfed("logs", "../x", env=env), "'../x'")


def test_long_and_newline_names_are_refused_before_any_file_is_touched(env, tmp_path):
    long = "a" * 400
    proc = hpcfed(
        "submit", "client", "--site", "local", "--name", long, "--command", "true", env=env
    )
    refused(proc, "400 characters")
    proc = hpcfed(
        "submit", "client", "--site", "local", "--name", "x\n", "--command", "true", "--dry-run",
        env=env,
    )  # fmt: skip
    refused(proc, "'x\\n'")
    assert not (tmp_path / "state" / "hpcfed" / "deployments").exists() or not os.listdir(
        tmp_path / "state" / "hpcfed" / "deployments"
    )


def test_hub_peer_id_with_a_trailing_newline_is_refused(env, tmp_path):
    init = hpcfed("hub", "init", "--endpoint", "127.0.0.1:51820", env=env)
    assert init.returncode == 0, init.stderr
    before = (tmp_path / "hub" / "peers.json").read_text()
    refused(hpcfed("hub", "genconf", "client", "x\n", env=env), "'x\\n'")
    assert (tmp_path / "hub" / "peers.json").read_text() == before
    assert not (Path(tmp_path / "hub" / "peers" / "client")).exists()


def test_extends_is_a_name_too(env, tmp_path):
    (tmp_path / "cfg" / "hpcfed" / "sites" / "mine.yaml").write_text(
        textwrap.dedent("""\
        extends: ../../../etc/hpcfed-x
        """)
    )
    refused(hpcfed("sites", "show", "mine", env=env), "'../../../etc/hpcfed-x'")
