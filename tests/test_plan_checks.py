"""Values the job uses are checked when the plan is built (`submit --dry-run` already refuses
them), with the parsers the job itself uses - not after the queue wait. `doctor` checks the same
values the way the job uses them (no shell expansion)."""

from __future__ import annotations

import os
import textwrap

import pytest
from helpers import hpcfed


@pytest.fixture()
def env(tmp_path, monkeypatch):
    # the profile files below are the only source of hpcfed_command (conftest points it at the
    # venv under test through the environment, which would win over a file)
    monkeypatch.delenv("HPCFED_SITE__HPCFED_COMMAND", raising=False)
    e = {
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HOME": str(tmp_path / "home"),
    }
    (tmp_path / "cfg" / "hpcfed" / "sites").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    return e


def site(tmp_path, name: str, body: str) -> str:
    path = tmp_path / "cfg" / "hpcfed" / "sites" / f"{name}.yaml"
    path.write_text("extends: local\n" + textwrap.dedent(body))
    return str(path)


def dry_run(env, *args, site_name="local"):
    return hpcfed(
        "submit", "client", "--site", site_name, "--name", "chk", "--command", "true",
        "--dry-run", *args, env=env,
    )  # fmt: skip


def refused(proc, *shown: str, code: int = 3) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for s in shown:
        assert s in lines[0], lines[0]
    assert "#SBATCH" not in proc.stdout  # nothing rendered
    return lines[0]


@pytest.mark.parametrize(
    "flag,spec,shown",
    [
        ("-L", "garbage", "-L 'garbage'"),
        ("-L", "8002=10.220.0.2:99999", "'99999' is not a port"),
        ("-L", "8002=not-an-ip:8002", "not a tunnel IPv4 address"),
        ("-R", "8002=127.0.0.1", "-R '8002=127.0.0.1'"),
        ("-R", "x=127.0.0.1:8002", "'x' is not a port"),
    ],
)
def test_bad_forwards_are_refused_at_submit(env, tmp_path, flag, spec, shown):
    conf = tmp_path / "wg.conf"
    conf.write_text("")
    refused(dry_run(env, "--tunnel-config", str(conf), flag, spec), shown)


@pytest.mark.parametrize(
    "args,shown",
    [
        (("--server-ip", "fl-server"), "--server-ip 'fl-server': not an IPv4 tunnel address"),
        (("--server-ip", "10.220.0.2", "-L", "8002=10.220.0.2:8002"), "not both"),
    ],
)
def test_a_bad_server_ip_is_refused_at_submit(env, tmp_path, args, shown):
    conf = tmp_path / "wg.conf"
    conf.write_text("")
    refused(dry_run(env, "--tunnel-config", str(conf), *args), shown)


def test_a_server_ip_without_a_tunnel_is_refused_at_submit(env):
    refused(dry_run(env, "--server-ip", "10.220.0.2"), "--server-ip: need --tunnel-config")


def test_a_forward_given_twice_is_refused_at_submit(env, tmp_path):
    conf = tmp_path / "wg.conf"
    conf.write_text("")
    proc = dry_run(
        env, "--tunnel-config", str(conf), "-L", "8002=10.220.0.2:8002", "-L", "8002=10.220.0.3:1"
    )
    refused(proc, "forwarded twice")


def test_good_forwards_still_render(env, tmp_path):
    conf = tmp_path / "wg.conf"
    conf.write_text("")
    proc = dry_run(
        env, "--tunnel-config", str(conf), "-L", "8002=10.220.0.2:8002", "-R", "9000=127.0.0.1:9001"
    )
    assert proc.returncode == 0, proc.stderr
    assert "8002=10.220.0.2:8002" in proc.stdout and "9000=127.0.0.1:9001" in proc.stdout


def test_a_kit_path_apptainer_cannot_bind_is_refused_at_submit(env, tmp_path):
    kit = tmp_path / "kits:site-1"  # apptainer splits --bind on ':'
    kit.mkdir()
    image = tmp_path / "role.sif"
    image.write_bytes(b"")
    proc = hpcfed(
        "submit", "client", "--site", "local", "--name", "chk", "--kit", str(kit),
        "--image", str(image), "--dry-run", env=env,
    )  # fmt: skip
    refused(proc, "--kit", "no ',' or ':'")


def test_a_space_in_partition_cannot_smuggle_sbatch_options(env):
    refused(dry_run(env, "--partition", "debug --account=someone-else"), "--partition", "one word")


@pytest.mark.parametrize(
    "body,key",
    [
        ("account: 'lab --qos=high'\n", "account"),
        ("partitions:\n  default: 'debug --exclusive'\n", "partitions"),
        ("apptainer:\n  binds: ['/data,/scratch']\n", "apptainer.binds"),
        ("apptainer:\n  binds: ['/data:/d:rx']\n", "apptainer.binds"),
        ("apptainer:\n  binary: '~/bin/apptainer'\n", "apptainer.binary"),
        ("hpcfed_command: '$HOME/venv/bin/hpcfed'\n", "hpcfed_command"),
        ("hpcfed_command: 'hpcfed --debug'\n", "hpcfed_command"),
        ("hpcfed_command: 'venv/bin/hpcfed'\n", "hpcfed_command"),
        ("gpus:\n  types: ['a100 --x']\n  default_type: null\n", "gpus.types"),
    ],
)
def test_profile_values_the_job_uses_are_refused_at_submit(env, tmp_path, body, key):
    path = site(tmp_path, "bad", body)
    refused(dry_run(env, site_name="bad"), path, key)


def test_ssh_without_a_host_is_a_profile_error(env, tmp_path):
    path = site(tmp_path, "nohost", "scheduler:\n  connect: ssh\n")
    refused(dry_run(env, site_name="nohost"), path, "scheduler.ssh.host")


def test_doctor_does_not_expand_what_the_job_will_not(env, tmp_path):
    # $HOME/bin/hpcfed exists, so `sh -c "command -v $HOME/bin/hpcfed"` said ok; the job runs
    # exec '$HOME/bin/hpcfed' and every job exited 127.
    bin_dir = tmp_path / "home" / "bin"
    bin_dir.mkdir()
    os.symlink(hpcfed_binary(), bin_dir / "hpcfed")
    path = site(tmp_path, "expand", "hpcfed_command: $HOME/bin/hpcfed\n")
    proc = hpcfed("doctor", "--site", "expand", "--json", env=env)
    assert proc.returncode != 0, proc.stdout
    import json

    checks = {c["check"]: c for c in json.loads(proc.stdout)}
    assert not checks["profile"]["ok"]
    assert path in checks["profile"]["detail"] and "hpcfed_command" in checks["profile"]["detail"]
    assert "hpcfed on cluster" not in checks or not checks["hpcfed on cluster"]["ok"]


def hpcfed_binary() -> str:
    from helpers import HPCFED

    return HPCFED[0]
