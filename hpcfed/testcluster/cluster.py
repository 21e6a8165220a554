"""Bring the local test cluster up and down: real munge, MariaDB, slurmdbd, slurmctld, slurmds.

Everything lives under the spec's prefix. `up` is idempotent; `down` stops only what `up`
started (recorded PIDs plus processes carrying our marker) and is safe to run twice.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from hpcfed.errors import EnvironmentProblem, HpcfedError
from hpcfed.testcluster import config, daemons
from hpcfed.testcluster.spec import PACKAGES, ClusterSpec

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class UpResult:
    already_running: bool
    started: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- preconditions


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"`hpcfed testcluster {action}` must run as root: it installs Debian packages and "
            "starts munge, MariaDB and the Slurm daemons (try: sudo hpcfed testcluster "
            f"{action})"
        )


def missing_packages(packages=PACKAGES) -> list[str]:
    missing = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def install_packages(packages: list[str], progress: Progress) -> None:
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise EnvironmentProblem(
            f"Debian package(s) {', '.join(packages)} missing and no apt-get to install them"
        )
    progress(f"installing Debian packages: {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    proc = subprocess.run(
        apt + ["install", "-y", "-q", "--no-install-recommends"] + packages,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        # The package lists may be missing on a fresh machine: update once and retry.
        subprocess.run(apt + ["update", "-q"], capture_output=True, text=True, env=env)
        proc = subprocess.run(
            apt + ["install", "-y", "-q", "--no-install-recommends"] + packages,
            capture_output=True,
            text=True,
            env=env,
        )
    still = missing_packages(packages)
    if proc.returncode != 0 or still:
        detail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EnvironmentProblem(
            f"could not install Debian package(s) {', '.join(still or packages)}: {detail}"
        )


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def check_ports(spec: ClusterSpec, skip: set) -> None:
    for owner, port in spec.ports().items():
        if owner in skip:
            continue
        if port_in_use(port):
            raise EnvironmentProblem(
                f"port {port} (needed by {owner}) is already in use; stop what holds it "
                f"(ss -ltnp 'sport = :{port}') or give the cluster other ports"
            )


# ---------------------------------------------------------------- the cluster


class TestCluster:
    __test__ = False  # not a pytest class

    def __init__(self, spec: ClusterSpec, progress: Progress = _quiet):
        self.spec = spec
        self.progress = progress
        self.table = daemons.DaemonTable(spec.path("run", "daemons.json"))

    # ---- helpers
    def _slurm_env(self) -> dict:
        return dict(os.environ, **self.spec.env())

    def _run(
        self, argv: list, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self._slurm_env(), timeout=timeout
        )
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise HpcfedError(f"{' '.join(argv[:3])} failed: {msg[-1] if msg else proc.returncode}")
        return proc

    def _log(self, name: str) -> str:
        return self.spec.path("log", f"{name}.out")

    def _start(self, name: str, argv: list, user: Optional[str] = None) -> subprocess.Popen:
        record, proc = daemons.start(
            name, argv, self._log(name), self.spec.prefix, user=user, env=self.spec.env()
        )
        self.table.add(record)
        return proc

    def _wait(
        self,
        what: str,
        ready: Callable[[], bool],
        proc: Optional[subprocess.Popen],
        timeout: float,
        log: str,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                if not os.path.exists(log):  # it died before opening its own log
                    log = self._log(what.split()[0].lower())
                raise EnvironmentProblem(
                    f"{what} exited with code {proc.returncode} while starting; see {log}: "
                    f"{_last_line(log)}"
                )
            time.sleep(0.2)
        raise EnvironmentProblem(
            f"{what} did not become ready in {timeout:.0f} s; see {log}: {_last_line(log)}"
        )

    def running(self) -> list:
        return [r for r in self.table.load() if r.alive()]

    def is_up(self) -> bool:
        records = self.table.load()
        wanted = {
            "mariadb",
            "slurmdbd",
            "slurmctld",
            *(f"slurmd-{n}" for n in self.spec.node_names),
        }
        alive = {r.name for r in records if r.alive()}
        return wanted <= alive

    # ---- up
    def up(self) -> UpResult:
        t0 = time.monotonic()
        require_root("up")
        if self.is_up():
            return UpResult(
                already_running=True,
                reused=[r.name for r in self.running()],
                seconds=time.monotonic() - t0,
            )
        # Daemons that died (or were stopped) are started again; the live ones, and the jobs
        # and state they hold, are left alone.
        alive = {r.name for r in self.running()}
        if alive:
            self.progress(f"still running: {', '.join(sorted(alive))}; starting the rest")
        install_packages(missing_packages(), self.progress)
        check_ports(
            self.spec,
            skip={owner for owner in self.spec.ports() if owner.replace(" ", "-") in alive},
        )
        self._prepare_files()
        result = UpResult(already_running=False)
        result.started, result.reused = [], sorted(alive)
        if "munge" not in alive:
            (result.reused if self._munge() == "reused" else result.started).append("munge")
        if "mariadb" not in alive:
            self._mariadb()
            result.started.append("mariadb")
        if "slurmdbd" not in alive:
            self._slurmdbd()
            result.started.append("slurmdbd")
        self._accounting()
        if "slurmctld" not in alive:
            self._slurmctld()
            result.started.append("slurmctld")
        for i, node in enumerate(self.spec.node_names):
            if f"slurmd-{node}" not in alive:
                self._slurmd(i, node)
                result.started.append(f"slurmd-{node}")
        self._wait_nodes_idle()
        result.seconds = time.monotonic() - t0
        return result

    def _prepare_files(self) -> None:
        s = self.spec
        for d in ("etc", "run", "log", "dev", "state/slurmctld"):
            os.makedirs(s.path(d), exist_ok=True)
        for node in s.node_names:
            os.makedirs(s.path("spool", node), exist_ok=True)
        # Readable by every user: job submitters need slurm.conf; the prefix's parents too.
        p = Path(s.prefix)
        while True:
            if p.exists():
                os.chmod(p, os.stat(p).st_mode | 0o755)
            if p.parent == p or str(p.parent) in ("/", "/var", "/var/lib"):
                break
            p = p.parent
        for i in range(s.gpus_per_node):
            dev = s.path("dev", f"nvidia{i}")
            if not (os.path.exists(dev) and stat.S_ISCHR(os.stat(dev).st_mode)):
                if os.path.exists(dev):
                    os.unlink(dev)
                # Same major as the real NVIDIA driver; Slurm needs a char device, not a file.
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, i))
        dbd_conf = s.path("etc", "slurmdbd.conf")
        files = config.render(s, _existing_db_password(dbd_conf) or secrets.token_hex(16))
        for name, text in files.items():
            path = s.path("etc", name)
            mode = 0o600 if name == "slurmdbd.conf" else 0o644
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        self._ensure_user(s.user)
        for user in s.extra_users:
            self._ensure_user(user)

    def _ensure_user(self, name: str) -> None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            self.progress(f"creating non-root user {name}")
            subprocess.run(
                ["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True
            )

    def _munge(self) -> str:
        if _munge_works():
            return "reused"  # a munged we did not start: leave it alone at `down`
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            subprocess.run(
                ["runuser", "-u", "munge", "--", "mungekey", "--create"],
                check=True,
                capture_output=True,
            )
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        os.chmod("/run/munge", 0o755)
        self.progress("starting munged")
        proc = self._start("munge", ["/usr/sbin/munged", "--foreground"], user="munge")
        self._wait("munged", _munge_works, proc, 15, self._log("munge"))
        return "started"

    def _mariadb(self) -> None:
        s = self.spec
        datadir = s.path("mysql", "data")
        rundir = s.path("mysql", "run")
        os.makedirs(rundir, exist_ok=True)
        shutil.chown(s.path("mysql"), "mysql", "mysql")
        shutil.chown(rundir, "mysql", "mysql")
        if not os.path.isdir(os.path.join(datadir, "mysql")):
            self.progress("initialising MariaDB")
            installed = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    "--user=mysql",
                    f"--datadir={datadir}",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                capture_output=True,
                text=True,
            )
            if installed.returncode != 0:
                raise EnvironmentProblem(f"mariadb-install-db failed: {_tail(installed)}")
        sock = os.path.join(rundir, "mysqld.sock")
        self.progress(f"starting MariaDB on 127.0.0.1:{s.mariadb_port}")
        proc = self._start(
            "mariadb",
            [
                "/usr/sbin/mariadbd",
                "--no-defaults",
                "--user=mysql",
                f"--datadir={datadir}",
                f"--socket={sock}",
                f"--port={s.mariadb_port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={rundir}/mariadb.pid",
                f"--log-error={rundir}/mariadb.err",
                "--innodb-buffer-pool-size=64M",
                "--skip-name-resolve",
            ],
        )
        self._wait(
            "MariaDB",
            lambda: _tcp_open(s.mariadb_port) and os.path.exists(sock),
            proc,
            60,
            f"{rundir}/mariadb.err",
        )
        password = _existing_db_password(s.path("etc", "slurmdbd.conf"))
        sql = "".join(
            f"CREATE USER IF NOT EXISTS 'slurm'@'{host}' IDENTIFIED BY '{password}';"
            f"ALTER USER 'slurm'@'{host}' IDENTIFIED BY '{password}';"
            f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{host}';"
            for host in ("localhost", "127.0.0.1")
        )
        # The SQL (with the password) goes through stdin, never argv.
        granted = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"],
            input=sql,
            capture_output=True,
            text=True,
        )
        if granted.returncode != 0:
            raise EnvironmentProblem(f"could not create the slurm database user: {_tail(granted)}")

    def _slurmdbd(self) -> None:
        s = self.spec
        self.progress(f"starting slurmdbd on port {s.slurmdbd_port}")
        proc = self._start("slurmdbd", ["/usr/sbin/slurmdbd", "-D"])
        self._wait(
            "slurmdbd", lambda: _tcp_open(s.slurmdbd_port), proc, 60, s.path("log", "slurmdbd.log")
        )

    def _sacctmgr(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["sacctmgr", "-i", *args], check=False)

    def _accounting(self) -> None:
        s = self.spec
        listed = self._run(
            ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], check=False, timeout=30
        )
        if s.cluster_name not in listed.stdout.split():
            self._sacctmgr("add", "cluster", s.cluster_name)
        accounts = self._run(
            ["sacctmgr", "-n", "-P", "list", "account", "format=account"], check=False
        ).stdout.split()
        if s.account not in accounts:
            self._sacctmgr(
                "add",
                "account",
                s.account,
                "Description=hpcfed test account",
                "Organization=hpcfed",
            )
        users = self._run(
            ["sacctmgr", "-n", "-P", "list", "assoc", "format=user,account"], check=False
        ).stdout.split()
        for user in ("root", s.user, *s.extra_users):
            if f"{user}|{s.account}" not in users:
                proc = self._sacctmgr("add", "user", user, f"account={s.account}")
                if proc.returncode != 0 and "Nothing new added" not in proc.stdout + proc.stderr:
                    raise EnvironmentProblem(
                        f"could not add accounting association for {user}: {_tail(proc)}"
                    )

    def _slurmctld(self) -> None:
        s = self.spec
        self.progress(f"starting slurmctld on port {s.slurmctld_port}")
        proc = self._start("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", s.slurm_conf])
        self._wait("slurmctld", self.controller_responds, proc, 60, s.path("log", "slurmctld.log"))

    def controller_responds(self) -> bool:
        try:
            proc = self._run(["scontrol", "ping"], check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and " is UP" in proc.stdout

    def _slurmd(self, index: int, node: str) -> None:
        s = self.spec
        self.progress(f"starting slurmd {node} on port {s.slurmd_port(index)}")
        self._start(f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-f", s.slurm_conf, "-N", node])

    def stop_daemon(self, name: str) -> bool:
        """Stop one of our daemons (tests: a scheduler that does not answer). `up` restarts it."""
        require_root("down")
        return any(daemons.stop(r) for r in self.table.load() if r.name == name)

    def node_states(self) -> dict:
        proc = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=15)
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def _wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        resumed = False
        states: dict = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if (
                states
                and all(
                    not st.startswith(("down", "drain", "unknown", "fail", "not_responding"))
                    and not st.endswith("*")
                    for st in states.values()
                )
                and set(states) == set(self.spec.node_names)
            ):
                return
            # Nodes left drained/down by an earlier run come back once told to.
            if not resumed and time.monotonic() > deadline - timeout + 5:
                bad = [n for n, st in states.items() if st.startswith(("down", "drain"))]
                if bad:
                    self._run(
                        ["scontrol", "update", f"NodeName={','.join(bad)}", "State=RESUME"],
                        check=False,
                    )
                resumed = True
            time.sleep(0.3)
        raise EnvironmentProblem(
            f"nodes did not become idle in {timeout:.0f} s: {states}; see {self.spec.path('log')}"
        )

    # ---- down
    def down(self) -> list:
        """Stop what we started. Returns the names stopped (empty when nothing ran)."""
        require_root("down")
        stopped = []
        if any(r.name == "slurmctld" and r.alive() for r in self.table.load()):
            self._cancel_all_jobs()
        order = ["slurmd", "slurmctld", "slurmdbd", "mariadb", "munge"]
        # "slurmd-node1" -> "slurmd"; slurmdbd must not sort with the slurmds.
        records = sorted(self.table.load(), key=lambda r: order.index(r.name.split("-")[0]))
        for record in records:
            if daemons.stop(record):
                stopped.append(record.name)
        # Leftovers spawned by our daemons (e.g. slurmstepd of a job) carry our marker.
        for pid in daemons.stop_marked(self.spec.prefix):
            stopped.append(f"pid {pid}")
        self.table.clear()
        return stopped

    def _cancel_all_jobs(self) -> None:
        proc = self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=15)
        ids = proc.stdout.split()
        if not ids:
            return
        self._run(["scancel", *ids], check=False, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = self._run(
                ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"], check=False, timeout=15
            ).stdout.split()
            if not left:
                return
            time.sleep(0.5)

    # ---- status
    def status(self) -> dict:
        s = self.spec
        records = self.table.load()
        info: Dict[str, Any] = {
            "prefix": s.prefix,
            "slurm_conf": s.slurm_conf,
            "up": self.is_up(),
            "daemons": [{"name": r.name, "pid": r.pid, "running": r.alive()} for r in records],
            "nodes": [],
            "partitions": [],
            "jobs": [],
        }
        if not (self.is_up() and self.controller_responds()):
            return info
        nodes = self._run(["sinfo", "-h", "-N", "-o", "%N|%T|%c|%m|%G|%P"], check=False).stdout
        seen = set()
        for line in nodes.splitlines():
            name, state, cpus, mem, gres, part = line.split("|")
            if name in seen:
                continue
            seen.add(name)
            info["nodes"].append(
                {
                    "name": name,
                    "state": state,
                    "cpus": int(cpus),
                    "memory_mb": int(mem),
                    "gres": gres,
                }
            )
        parts = self._run(["scontrol", "show", "partition", "-o"], check=False).stdout
        for line in parts.splitlines():
            kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            info["partitions"].append(
                {
                    "name": kv.get("PartitionName"),
                    "default": kv.get("Default") == "YES",
                    "priority_tier": int(kv.get("PriorityTier", 0)),
                    "preempt_mode": kv.get("PreemptMode"),
                    "grace_time_s": int(kv.get("GraceTime", 0)),
                    "nodes": kv.get("Nodes"),
                }
            )
        jobs = self._run(["squeue", "-h", "-o", "%i|%u|%P|%j|%T|%b|%N"], check=False).stdout
        for line in jobs.splitlines():
            jid, user, part, name, state, gres, nodelist = line.split("|", 6)
            info["jobs"].append(
                {
                    "id": jid,
                    "user": user,
                    "partition": part,
                    "name": name,
                    "state": state,
                    "gres": gres,
                    "nodes": nodelist,
                }
            )
        return info


def _existing_db_password(path: str) -> Optional[str]:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("StoragePass="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def _munge_works() -> bool:
    if shutil.which("munge") is None or not os.path.exists("/run/munge/munge.socket.2"):
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5)
        return check.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _last_line(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
