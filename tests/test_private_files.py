"""Secrets are written to files only we own, 0600 from the first byte, even in a shared sticky
directory where another (real) user can pre-create any name we might use."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from helpers import hpcfed, need, run

from hpcfed.tunnel.files import write_private

OTHER = "hpcuser"  # the second, non-root user made by scripts/bootstrap


def _other_uid() -> int:
    try:
        return pwd.getpwnam(OTHER).pw_uid
    except KeyError:
        need(False, f"user {OTHER} missing (scripts/bootstrap)")
        raise


@pytest.fixture()
def reachable(tmp_path):
    """A fresh directory the other user can reach (pytest's own tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="hpcfed-private-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def shared_dir(reachable):
    """A world-writable sticky directory like /tmp, owned by the other user."""
    need(os.geteuid() == 0, "needs root to act as a second user")
    uid = _other_uid()
    d = reachable / "shared"
    d.mkdir()
    os.chown(d, uid, uid)
    os.chmod(d, 0o1777)
    return d


def test_predictable_temp_names_pre_created_by_another_user_are_not_used(shared_dir):
    target = shared_dir / "wg.key"
    # The other user plants every name a predictable writer could use: <name>.tmp<pid> (what
    # write_private used), .<name>.tmp, and a symlink where the key itself goes is not ours to
    # plant (the sticky bit protects our own file); each planted file is theirs, 0666.
    planted = [
        shared_dir / f"wg.key.tmp{os.getpid()}",
        shared_dir / ".wg.key.tmp",
        shared_dir / f".wg.key.{os.getpid()}",
    ]
    for p in planted:
        proc = run(["sh", "-c", f"umask 0; printf 'theirs' > '{p}'; chmod 0666 '{p}'"], user=OTHER)
        assert proc.returncode == 0, proc.stderr

    write_private(target, "SECRET\n")

    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
    assert target.read_text() == "SECRET\n"
    for p in planted:  # untouched: still theirs, still their content
        assert p.read_text() == "theirs" and p.stat().st_uid == _other_uid()
    # nothing else of ours was left behind (no temp file)
    assert sorted(x.name for x in shared_dir.iterdir()) == sorted(
        ["wg.key"] + [p.name for p in planted]
    )


def test_a_symlink_planted_at_a_temp_name_is_not_followed(shared_dir, reachable):
    decoy = reachable / "decoy"
    decoy.write_text("")
    os.chmod(decoy, 0o666)
    proc = run(["ln", "-s", str(decoy), str(shared_dir / f"k.tmp{os.getpid()}")], user=OTHER)
    assert proc.returncode == 0, proc.stderr
    write_private(shared_dir / "k", "SECRET\n")
    assert decoy.read_text() == ""
    assert stat.S_IMODE((shared_dir / "k").stat().st_mode) == 0o600


def test_rewrite_keeps_mode_and_owner(tmp_path):
    target = tmp_path / "k"
    write_private(target, "one")
    write_private(target, "two")
    assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_vpn_keygen_into_a_directory_we_cannot_write_is_one_line(reachable):
    need(os.geteuid() == 0, "needs root to act as a second user")
    _other_uid()
    locked = reachable / "locked"
    locked.mkdir(mode=0o755)  # root's: the other user cannot create files in it
    home = reachable / "cfg"
    home.mkdir()
    os.chown(home, _other_uid(), _other_uid())
    proc = hpcfed(
        "vpn",
        "keygen",
        "--private-key-file",
        str(locked / "site.key"),
        env={"XDG_CONFIG_HOME": str(home)},
        user=OTHER,
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(locked / "site.key") in lines[0], proc.stderr
    assert "Permission denied" in lines[0] and "Traceback" not in proc.stderr
    assert not list(Path(locked).iterdir())
