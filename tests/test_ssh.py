"""Submitting from a "laptop" over SSH (paramiko) to a real OpenSSH server on loopback whose
user submits to the real Slurm test cluster: submit, poll, fetch logs, cancel - and host keys
are checked, never accepted blindly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from helpers import hpcfed, need, run

pytestmark = [pytest.mark.sshd, pytest.mark.slurm]
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(slurm_cluster):
    """A real sshd on 127.0.0.1:<port> letting the cluster user in with a test key."""
    need(os.path.exists(SSHD), "OpenSSH server not installed (scripts/bootstrap.d/45-openssh.sh)")
    d = Path(tempfile.mkdtemp(prefix="hpcfed-sshd-"))
    os.chmod(d, 0o755)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o644)
    port = free_port()
    (d / "sshd_config").write_text(
        textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {d}/host_key
        PidFile {d}/sshd.pid
        AuthorizedKeysFile {d}/authorized_keys
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM yes
        StrictModes no
        PermitRootLogin no
        AllowUsers {slurm_cluster.user}
        Subsystem sftp internal-sftp
        LogLevel VERBOSE
        """)
    )
    os.makedirs("/run/sshd", exist_ok=True)
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.1)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    yield {"dir": d, "port": port, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def laptop(sshd, tmp_path, slurm_cluster):
    """A laptop user: its own config/state, a site profile that reaches the cluster over SSH."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "state")}
    sites = tmp_path / "cfg" / "hpcfed" / "sites"
    sites.mkdir(parents=True)

    def site(name, known_hosts):
        (sites / f"{name}.yaml").write_text(
            textwrap.dedent(f"""\
            extends: local
            scheduler:
              connect: ssh
              ssh:
                host: 127.0.0.1
                port: {sshd["port"]}
                user: {slurm_cluster.user}
                key: {sshd["dir"]}/client_key
                known_hosts: {known_hosts}
            """)
        )

    site("viassh", sshd["dir"] / "known_hosts")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    site("unknownhost", empty)
    wrong = tmp_path / "wrong_known_hosts"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} {other[0]} {other[1]}\n")
    site("wronghost", wrong)
    return env


@pytest.mark.timeout(240)
def test_submit_poll_logs_cancel_over_ssh(laptop, slurm_cluster):
    name = f"ssh-{uuid.uuid4().hex[:6]}"
    cmd = 'echo "GPUS=$CUDA_VISIBLE_DEVICES USER=$(id -un)"; sleep 300'
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "viassh",
        "--gpus",
        "2",
        "--name",
        name,
        "--command",
        cmd,
        "--json",
        env=laptop,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    assert "127.0.0.1" in proc.stderr  # progress says where it went

    # The job belongs to the remote user, not the laptop's.
    owner = run(["squeue", "--noheader", "--jobs", job_id, "--format=%u"]).stdout.strip()
    assert owner == slurm_cluster.user

    deadline = time.monotonic() + 60
    while True:
        proc = hpcfed("status", name, "--json", env=laptop)
        assert proc.returncode == 0, proc.stderr
        dep = json.loads(proc.stdout)["deployments"][0]
        if dep["job_state"] == "RUNNING":
            break
        assert time.monotonic() < deadline, dep
        time.sleep(0.5)

    deadline = time.monotonic() + 30
    while True:
        log = hpcfed("logs", name, env=laptop).stdout  # fetched over SFTP
        if "GPUS=" in log:
            break
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
    line = [l for l in log.splitlines() if l.startswith("GPUS=")][0]
    assert len(line.split()[0][5:].split(",")) == 2 and f"USER={slurm_cluster.user}" in line

    proc = hpcfed("cancel", name, env=laptop)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while True:
        dep = json.loads(hpcfed("status", name, "--json", env=laptop).stdout)["deployments"][0]
        if dep["job_state"] not in ("RUNNING", "COMPLETING", "PENDING"):
            break
        assert time.monotonic() < deadline, dep
        time.sleep(0.5)
    assert dep["state"] == "STOPPED"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "site,message",
    [
        ("unknownhost", "unknown host key"),
        ("wronghost", "host key does NOT match"),
    ],
)
def test_host_keys_are_checked(laptop, site, message):
    name = f"hk-{uuid.uuid4().hex[:6]}"
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        site,
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        "true",
        env=laptop,
    )
    assert proc.returncode == 7, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    # nothing submitted (other tests may be submitting their own jobs meanwhile)
    assert (
        run(["squeue", "--noheader", "--states=all", f"--name=hpcfed-{name}", "--format=%i"]).stdout
        == ""
    )
    assert hpcfed("status", name, env=laptop).returncode == 8  # nothing recorded


# --- known_hosts as OpenSSH writes it, and never rewritten --------------------------------------
def _host_line(sshd) -> str:
    return (sshd["dir"] / "known_hosts").read_text()


def _other_key(tmp_path, name: str) -> str:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    return " ".join((tmp_path / f"{name}.pub").read_text().split()[:2])


def _ssh_site(tmp_path, sshd, slurm_cluster, name, known_hosts, accept=False):
    sites = tmp_path / "cfg" / "hpcfed" / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    (sites / f"{name}.yaml").write_text(
        textwrap.dedent(f"""\
        extends: local
        scheduler:
          connect: ssh
          ssh:
            host: 127.0.0.1
            port: {sshd["port"]}
            user: {slurm_cluster.user}
            key: {sshd["dir"]}/client_key
            known_hosts: {known_hosts}
            accept_unknown_host: {"true" if accept else "false"}
        """)
    )
    return {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "state")}


def _scheduler_check(proc):
    assert "Traceback" not in proc.stderr and proc.stdout.strip(), proc.stderr
    checks = {c["check"]: c for c in json.loads(proc.stdout)}
    return checks["scheduler"]


@pytest.mark.timeout(120)
def test_known_hosts_with_cert_authority_revoked_and_hashed_lines(sshd, slurm_cluster, tmp_path):
    other = _other_key(tmp_path, "other")
    hashed = run(["ssh-keygen", "-H", "-f", "-"], input=f"otherhost {other}\n")
    known = tmp_path / "known_hosts"
    known.write_text(
        "# the user's own comment\n"
        f"@cert-authority *.example.org {other}\n"
        f"@revoked * {other}\n"
        + (hashed.stdout if hashed.returncode == 0 else "")
        + "\n"
        + _host_line(sshd)
    )
    before = known.read_bytes()
    env = _ssh_site(tmp_path, sshd, slurm_cluster, "markers", known)
    proc = hpcfed("doctor", "--site", "markers", "--json", env=env)
    check = _scheduler_check(proc)
    assert check["ok"], check  # exited 70 (paramiko cannot parse the markers) before
    assert known.read_bytes() == before


@pytest.mark.timeout(120)
def test_a_host_vouched_for_only_by_a_cert_authority_is_unknown(sshd, slurm_cluster, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {_other_key(tmp_path, 'ca')}\n")
    env = _ssh_site(tmp_path, sshd, slurm_cluster, "onlyca", known)
    proc = hpcfed("doctor", "--site", "onlyca", "--json", env=env)
    assert proc.returncode == 4, proc.stderr  # doctor: scheduler check failed (70 before)
    check = _scheduler_check(proc)
    assert not check["ok"] and "unknown host key" in check["detail"]
    assert "@cert-authority lines are skipped" in check["detail"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accept", [False, True])
def test_a_revoked_host_key_is_refused(sshd, slurm_cluster, tmp_path, accept):
    host_key = " ".join(_host_line(sshd).split()[1:3])
    known = tmp_path / "known_hosts"
    known.write_text(_host_line(sshd) + f"@revoked * {host_key}\n")
    env = _ssh_site(tmp_path, sshd, slurm_cluster, "revoked", known, accept=accept)
    proc = hpcfed("doctor", "--site", "revoked", "--json", env=env)
    check = _scheduler_check(proc)
    assert not check["ok"] and "revoked" in check["detail"], check
    assert not (tmp_path / "state" / "hpcfed" / "known_hosts").exists()


@pytest.mark.timeout(120)
def test_accept_unknown_host_never_rewrites_the_users_known_hosts(sshd, slurm_cluster, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"# keep me\notherhost {_other_key(tmp_path, 'other')}\n# and me\n")
    before = known.read_bytes()
    env = _ssh_site(tmp_path, sshd, slurm_cluster, "tofu", known, accept=True)
    for _ in range(2):  # the second run finds the key it remembered: no duplicate line
        proc = hpcfed("doctor", "--site", "tofu", "--json", env=env)
        assert _scheduler_check(proc)["ok"], proc.stderr
    assert known.read_bytes() == before  # paramiko's AutoAddPolicy rewrote it (comments lost)
    own = tmp_path / "state" / "hpcfed" / "known_hosts"
    lines = own.read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[1:3] == _host_line(sshd).split()[1:3]
    assert oct(own.stat().st_mode & 0o777) == "0o600"
    assert "accepted the unknown host key" in proc.stderr or len(lines) == 1


def _ssh_target(sshd, slurm_cluster, **extra):
    """The test sshd as a plan's scheduler.ssh: the cluster user, its key, the pinned host key."""
    from hpcfed.plan import SshTarget

    return SshTarget(
        host="127.0.0.1",
        port=sshd["port"],
        user=slurm_cluster.user,
        key=str(sshd["dir"] / "client_key"),
        known_hosts=str(sshd["dir"] / "known_hosts"),
        **extra,
    )


def _descendants(pid: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.timeout(60)
def test_sftp_read_from_a_hung_login_node_times_out(sshd, slurm_cluster):
    import signal

    from hpcfed.errors import SchedulerUnavailable
    from hpcfed.plan import SchedulerTarget
    from hpcfed.runner import make_runner

    ssh = _ssh_target(sshd, slurm_cluster)
    # scheduler.timeout bounds every SFTP request too (before: no timeout, the read hung)
    runner = make_runner(SchedulerTarget(connect="ssh", ssh=ssh, timeout=2))
    assert runner.read_file("/etc/hostname")  # the SFTP session is open
    hung = _descendants(sshd["pid"])  # this connection's sshd processes (the listener stays)
    assert hung
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(SchedulerUnavailable, match="no answer within 2s"):
            runner.read_file("/etc/hostname")
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
        runner.close()


@pytest.mark.timeout(60)
def test_an_input_copied_over_sftp_is_the_users_own_0600_file(sshd, slurm_cluster):
    """`submit --input` on an SSH site: the file lands whole, owned by the cluster user, 0600
    from the first byte, replacing an earlier copy."""
    import pwd
    import stat
    import uuid

    from hpcfed.plan import SchedulerTarget
    from hpcfed.runner import make_runner

    ssh = _ssh_target(sshd, slurm_cluster, accept_unknown_host=True)
    pw = pwd.getpwnam(slurm_cluster.user)
    target = Path(pw.pw_dir) / f"sftp-input-{uuid.uuid4().hex[:6]}" / "experiment.py"
    runner = make_runner(SchedulerTarget(connect="ssh", ssh=ssh, timeout=10))
    try:
        runner.mkdirs(str(target.parent))
        runner.write_file(str(target), b"print('one')\n")
        runner.write_file(str(target), b"print('two')\n")
        assert target.read_bytes() == b"print('two')\n"
        st = target.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pw.pw_uid
        assert [p.name for p in target.parent.iterdir()] == ["experiment.py"]  # no temp left
    finally:
        runner.close()
        shutil.rmtree(target.parent, ignore_errors=True)
