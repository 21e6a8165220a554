"""The role's process: its command, its process group, its output, its graceful stop.

One RoleProcess is one start of the role; a retried role is a new one. The role runs in a
process group of its own, so a signal reaches it and everything it started (Apptainer, the
framework's helper processes). When its framework has failures it only prints (roles.yaml
`failures`), its output passes through a thread that copies it to the job log and recognises
them, so the job's log says why in one line instead of a framework traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Sequence, Tuple

from hpcfed.errors import ExitCode, HpcfedError, signal_exit
from hpcfed.frameworks import LOCAL_BIND, Failure, fill_local_ports
from hpcfed.frameworks import role as role_of
from hpcfed.plan import Plan
from hpcfed.supervisor.job_environment import JobPaths
from hpcfed.supervisor.records import log
from hpcfed.tunnel import job as tunnel_job

RETRY_PAUSE = 10  # seconds between starts of a role that failed in a way that passes


def free_port() -> int:
    """A port no one on this node listens on now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((LOCAL_BIND, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the command


def role_command(
    plan: Plan, paths: JobPaths, ws: Path, base_env: Mapping[str, str]
) -> Tuple[List[str], Dict[str, str]]:
    """(argv, environment) of the role, in its container when the plan has an image."""
    if plan.tunnel and plan.tunnel.hosts and not plan.image:
        log(
            "warning: without a container image the server name resolves through the node's "
            "own /etc/hosts, not to the tunnel; use --image"
        )
    command = list(fill_local_ports(plan.command, local_ports(plan)))
    if plan.image:
        argv, extra = container_command(plan, plan.image, paths, ws, command)
    else:
        argv, extra = command, dict(plan.env)
    env = dict(base_env)
    env.update(extra)
    env["HPCFED_DEPLOYMENT"] = plan.name
    return argv, env


def container_command(
    plan: Plan, image: str, paths: JobPaths, ws: Path, command: List[str]
) -> Tuple[List[str], Dict[str, str]]:
    try:
        from hpcfed.container.apptainer import exec_argv
    except ImportError:
        raise HpcfedError("the plan has an image but hpcfed.container is not installed") from None
    c = plan.container
    argv, env = exec_argv(
        apptainer=c.apptainer,
        image=image,
        command=command,
        gpu_flag=c.gpu_flag if plan.resources.gpus > 0 else None,
        binds=list(c.binds),
        kit_dir=plan.kit,
        workspace=str(ws),
        env=dict(plan.env),
        hosts_file=hosts_file(plan, paths),
    )
    return list(argv), dict(env)


def local_ports(plan: Plan) -> Dict[str, int]:
    """A free port on this node for each of the role's per-job ports (the container shares
    the node's network: two jobs of the role on one node must not ask for the same one)."""
    ports = {name: free_port() for name in plan.local_ports}
    if ports:
        log("local ports: " + ", ".join(f"{n} {p}" for n, p in ports.items()))
    return ports


def hosts_file(plan: Plan, paths: JobPaths) -> Optional[str]:
    """An /etc/hosts for the container mapping the federation's server name to where the
    tunnel delivers it (the kit's certificates fix the name, so only the address can move)."""
    t = plan.tunnel
    if t is None or not t.hosts:
        return None
    paths.hosts.write_text(tunnel_job.hosts_text(t.hosts))
    log("container /etc/hosts: " + ", ".join(f"{n} -> {a}" for n, a in t.hosts))
    return str(paths.hosts)


def failures_of(plan: Plan) -> Tuple[Failure, ...]:
    """The framework's known failures, unless --command replaced the role's program."""
    role = role_of(plan.framework, plan.role)
    return role.failures if plan.command[:1] == role.command[:1] else ()


# ---------------------------------------------------------------- framework failures


def failure_exit(failure: Failure, framework: str) -> Tuple[ExitCode, str]:
    """The job's exit code for a framework's failure, and the reason naming the framework's own
    code (Flower's 305 would reach Slurm as 305 mod 256 = 49, which means nothing)."""
    reason = f"{failure.exit.label}: {failure.message}; {framework} exit code {failure.code}"
    return failure.exit, reason


def retryable(failure: Optional[Failure], elapsed: float) -> bool:
    """A failure that passes by itself, within its `retry_for` seconds since this run of the
    job began (e.g. a requeued SuperNode is refused until the SuperLink has seen its previous
    run go offline), with time for one more pause."""
    if failure is None or not failure.retry_for:
        return False
    return elapsed + RETRY_PAUSE <= failure.retry_for


# ---------------------------------------------------------------- the process


class RoleProcess:
    def __init__(
        self,
        proc: subprocess.Popen,
        framework: str,
        role: str,
        failures: Sequence[Failure] = (),
        out: Optional[IO[bytes]] = None,
    ):
        self.proc = proc
        self.framework = framework
        self.label = f"{framework} {role}"  # how log lines name the role
        self.failures = tuple(failures)
        self.failure: Optional[Failure] = None  # the first known failure seen in its output
        self.watcher: Optional[threading.Thread] = None
        if self.failures:
            self.watcher = threading.Thread(target=self._watch, args=(out,), daemon=True)
            self.watcher.start()

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        framework: str,
        role: str,
        failures: Sequence[Failure] = (),
        out: Optional[IO[bytes]] = None,
    ) -> RoleProcess:
        """Start argv in a process group of its own. Its output is read only when there are
        failures to look for; otherwise it goes straight to the job log."""
        pipe = subprocess.PIPE if failures else None
        proc = subprocess.Popen(
            list(argv),
            cwd=str(cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            stdout=pipe,
            stderr=subprocess.STDOUT if failures else None,
        )
        return cls(proc, framework, role, failures, out)

    def _watch(self, out: Optional[IO[bytes]]) -> None:
        """Copy the role's output to the job log; note the first known failure in it."""
        assert self.proc.stdout is not None
        out = out or sys.stdout.buffer
        for raw in self.proc.stdout:
            out.write(raw)
            out.flush()
            if self.failure is None:
                self._recognise(raw.decode(errors="replace"))

    def _recognise(self, line: str) -> None:
        for f in self.failures:
            if f.pattern in line:
                self.failure = f
                log(f"{self.label}: {f.message} ({self.framework} exit code {f.code})")
                return

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def output_read(self, timeout: float = 5) -> None:
        """Let the watcher read the exited role's last lines before its failure is judged (a
        lingering grandchild may hold the pipe open: then not longer than `timeout`)."""
        if self.watcher is not None:
            self.watcher.join(timeout)

    def exit_code(self) -> int:
        """Wait for the role; its exit status the shell's way (killed by signal N: 128 + N)."""
        code = self.proc.wait()
        self.output_read()
        return signal_exit(-code) if code < 0 else code

    def stop(self, stop_command: Optional[Sequence[str]], grace: int, cwd: Path) -> None:
        """The framework's own stop if it has one, then SIGTERM, then SIGKILL after `grace`."""
        if self.proc.poll() is not None:
            return
        if stop_command and self._stop_gracefully(stop_command, grace, cwd):
            return
        log("sending SIGTERM to the role")
        self._signal(signal.SIGTERM)
        if self._wait(grace):
            return
        log(f"role still running after {grace}s; SIGKILL")
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _stop_gracefully(self, stop_command: Sequence[str], grace: int, cwd: Path) -> bool:
        """Half the grace time for the command, half for the role to go (then TERM, KILL)."""
        log(f"graceful stop: {' '.join(stop_command)}")
        try:
            subprocess.run(
                list(stop_command),
                cwd=str(cwd),
                timeout=max(1, grace // 2),
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log(f"graceful stop failed: {exc}")
        return self._wait(max(1, grace // 2))

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is gone already: what we wanted

    def _wait(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False
