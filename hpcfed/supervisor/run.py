"""The supervisor's one job, step by step (see the package docstring)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hpcfed.errors import ConfigError, GpuPreflightFailed, HpcfedError, KitError, TunnelError
from hpcfed.frameworks import LOCAL_BIND, fill_local_ports
from hpcfed.frameworks import role as role_of_framework
from hpcfed.plan import Plan
from hpcfed.tunnel import job as tunnel_job

EXIT_PREFLIGHT = 10
EXIT_TUNNEL = 9


RETRY_PAUSE = 10  # seconds between starts of a role that failed in a way that passes


def role_of(plan: Plan):
    return role_of_framework(plan.framework, plan.role)


def free_port() -> int:
    """A port no one on this node listens on now (the kernel's pick for port 0)."""
    import socket

    with socket.socket() as sock:
        sock.bind((LOCAL_BIND, 0))
        return sock.getsockname()[1]


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[hpcfed-job {stamp}] {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, plan: Plan, workdir: Path):
        self.plan = plan
        self.workdir = workdir
        self.job_id = os.environ.get("SLURM_JOB_ID", "nojob")
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.role: Optional[subprocess.Popen] = None
        self.tunnel: Optional[tunnel_job.TunnelChild] = None
        self.preflight_report: Optional[dict] = None
        self.stop_reason: Optional[str] = None
        self.stop_signal: Optional[int] = None
        self.stop_started = 0.0
        self.started = time.monotonic()  # this run of the job (a requeued job starts afresh)
        self.terminating = False  # SIGTERM/SIGINT seen: Slurm is ending the job now
        self.failure = None  # a known failure of the framework seen in the role's output
        self.watcher: Optional[threading.Thread] = (
            None  # the thread reading the role's output for those
        )

    def event(self, kind: str, detail: str = "") -> None:
        """Append to events.jsonl in the deployment directory (`hpcfed status NAME` shows it).
        One short line per write with O_APPEND, so concurrent writers never interleave."""
        line = (
            json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "event": kind,
                    "detail": detail,
                    "job_id": self.job_id,
                    "restart": self.restart,
                    "source": "job",
                }
            )
            + "\n"
        )
        try:
            fd = os.open(
                self.workdir / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log(f"cannot record event {kind}: {exc}")

    # (1) GPU preflight
    def preflight(self) -> Optional[dict]:
        pf = self.plan.preflight
        if not pf.enabled:
            return None
        try:
            from hpcfed.gpu.preflight import run_preflight
        except ImportError:
            log("GPU preflight: hpcfed.gpu.preflight not installed; skipped")
            return None
        report = run_preflight(pf.min_memory_mib, pf.allow_without_nvml)
        log(f"GPU preflight passed: {json.dumps(report, sort_keys=True, default=str)}")
        return report

    # (2) tunnel (hpcfed.tunnel.job holds the how; the plan holds the forwards)
    def start_tunnel(self) -> None:
        t = self.plan.tunnel
        if t is None:
            return
        ready = str(self.workdir / f"tunnel-{self.job_id}.ready")
        argv = tunnel_job.tunnel_argv(
            t.config, t.local_forwards, t.remote_forwards, ready, t.ready_timeout
        )
        log(f"starting tunnel: {' '.join(argv[1:])}")
        self.tunnel = tunnel_job.TunnelChild.start(argv, ready)
        self.tunnel.wait_ready(t.ready_timeout, stopping=lambda: self.stop_reason is not None)
        if self.stop_reason is None:
            log("tunnel is up")

    # (3) workspace
    def workspace(self) -> Path:
        # Only an NVFlare startup kit becomes a workspace of its own; other credentials are
        # mounted read-only as they are, and the role works in the deployment's directory.
        if not self.plan.kit or role_of(self.plan).credentials != "nvflare-kit":
            return self.workdir
        try:
            from hpcfed.kit.workspace import prepare_workspace
        except ImportError:
            raise KitError("the plan has a kit but hpcfed.kit.workspace is not installed") from None
        no_driver = bool(self.preflight_report and self.preflight_report.get("skipped"))
        if no_driver:
            log(
                "GPUs without a driver (allowed by the site profile): NVFlare will not count host GPUs"
            )
        ws = prepare_workspace(
            self.plan.kit,
            str(self.workdir),
            self.plan.role,
            self.plan.resources.gpus,
            gpus_without_driver=no_driver,
            listen_port=self.plan.tunnel.listen_port if self.plan.tunnel else None,
        )
        log(f"workspace: {ws}")
        return Path(ws)

    # (4) the role
    def role_argv(self, ws: Path) -> Tuple[List[str], Dict[str, str]]:
        command = list(fill_local_ports(self.plan.command, self.local_ports()))
        if not self.plan.image:
            return command, dict(self.plan.env)
        try:
            from hpcfed.container.apptainer import exec_argv
        except ImportError:
            raise HpcfedError(
                "the plan has an image but hpcfed.container is not installed"
            ) from None
        c = self.plan.container
        gpu_flag = c.gpu_flag if self.plan.resources.gpus > 0 else None
        argv, env = exec_argv(
            apptainer=c.apptainer,
            image=self.plan.image,
            command=command,
            gpu_flag=gpu_flag,
            binds=list(c.binds),
            kit_dir=self.plan.kit,
            workspace=str(ws),
            env=dict(self.plan.env),
            hosts_file=self.hosts_file(),
        )
        return list(argv), dict(env)

    def local_ports(self) -> Dict[str, int]:
        """A free port on this node for each of the role's per-job ports (the container shares
        the node's network: two jobs of the role on one node must not ask for the same one)."""
        ports = {name: free_port() for name in self.plan.local_ports}
        if ports:
            log("local ports: " + ", ".join(f"{n} {p}" for n, p in ports.items()))
        return ports

    def hosts_file(self) -> Optional[str]:
        """An /etc/hosts for the container mapping the federation's server name to where the
        tunnel delivers it (the kit's certificates fix the name, so only the address can move)."""
        t = self.plan.tunnel
        if t is None or not t.hosts:
            return None
        path = self.workdir / f"hosts-{self.job_id}"
        path.write_text(tunnel_job.hosts_text(t.hosts))
        log("container /etc/hosts: " + ", ".join(f"{n} -> {a}" for n, a in t.hosts))
        return str(path)

    def start_role(self, ws: Path) -> None:
        if self.plan.tunnel and self.plan.tunnel.hosts and not self.plan.image:
            log(
                "warning: without a container image the server name resolves through the node's "
                "own /etc/hosts, not to the tunnel; use --image"
            )
        argv, extra_env = self.role_argv(ws)
        env = dict(os.environ)
        env.update(extra_env)
        env["HPCFED_DEPLOYMENT"] = self.plan.name
        log(f"starting {self.plan.framework} {self.plan.role} in {ws}: {' '.join(argv)}")
        # Own process group: signals go to the role and everything it started.
        role = role_of(self.plan)
        # --command replaces the role's program: then the framework's failures do not apply.
        failures = role.failures if self.plan.command[:1] == role.command[:1] else ()
        self.role = subprocess.Popen(
            argv,
            cwd=str(ws),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            stdout=subprocess.PIPE if failures else None,
            stderr=subprocess.STDOUT if failures else None,
        )
        if failures:
            watcher = threading.Thread(target=self.watch_output, args=(failures,), daemon=True)
            watcher.start()
            self.watcher = watcher

    def watch_output(self, failures) -> None:
        """Copy the role's output to the job log and recognise the framework's known failures
        (e.g. Flower's exit code 305: a SuperNode whose key is not registered), so the job's
        log says why in one line instead of a framework traceback."""
        assert self.role is not None and self.role.stdout is not None
        out = sys.stdout.buffer
        for raw in self.role.stdout:
            out.write(raw)
            out.flush()
            if self.failure is None:
                line = raw.decode(errors="replace")
                for f in failures:
                    if f.pattern in line:
                        self.failure = f
                        log(
                            f"{self.plan.framework} {self.plan.role}: {f.message} (exit code {f.exit_code})"
                        )

    def retry_role(self, ws: Path) -> bool:
        """Start the role again after a known failure that passes by itself (its `retry_for`
        seconds since this run of the job began; e.g. a requeued SuperNode is refused until the
        SuperLink has seen its previous run go offline). False: the role's end stands."""
        self.output_read()
        f = self.failure
        if f is None or not f.retry_for or self.stop_reason:
            return False
        if time.monotonic() - self.started + RETRY_PAUSE > f.retry_for:
            return False
        log(f"retrying in {RETRY_PAUSE}s (for up to {f.retry_for}s since the job started)")
        deadline = time.monotonic() + RETRY_PAUSE
        while time.monotonic() < deadline and not self.stop_reason:
            time.sleep(0.2)
        if self.stop_reason:
            return False
        self.role.wait()
        self.failure = None
        self.start_role(ws)
        return True

    def output_read(self, timeout: float = 5) -> None:
        """Let the watcher read the exited role's last lines before its failure is judged (a
        lingering grandchild may hold the pipe open: then not longer than `timeout`)."""
        if self.watcher is not None:
            self.watcher.join(timeout)

    # (5) signals
    def on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum != getattr(signal, f"SIG{self.plan.preemption.signal}"):
            self.terminating = True
        if self.stop_reason is None:
            user_sig = f"SIG{self.plan.preemption.signal}"
            if name == user_sig:
                self.stop_reason = f"{name}: preemption or time limit ahead ({self._which_end()})"
            else:
                self.stop_reason = f"{name}: job is being stopped"
            self.stop_signal = signum
            self.stop_started = time.monotonic()
            log(f"received {self.stop_reason}; stopping the role")

    def _which_end(self) -> str:
        """Slurm sends the same warning for both; the time already run tells them apart."""
        left = self.plan.resources.time_seconds - (time.monotonic() - self.started)
        if left <= self.plan.preemption.lead_time + 30:  # slurmctld may signal up to ~30 s late
            return f"time limit in about {max(0, int(left))}s"
        return "preemption"

    def stop_role(self) -> None:
        if self.role is None or self.role.poll() is not None:
            return
        grace = self.plan.preemption.grace
        if self.plan.stop_command:
            log(f"graceful stop: {' '.join(self.plan.stop_command)}")
            try:
                subprocess.run(
                    list(self.plan.stop_command),
                    cwd=str(self.workdir),
                    timeout=max(1, grace // 2),
                    stdin=subprocess.DEVNULL,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log(f"graceful stop failed: {exc}")
            if self._wait_role(max(1, grace // 2)):
                return
        log("sending SIGTERM to the role")
        self._signal_role(signal.SIGTERM)
        if self._wait_role(grace):
            return
        log(f"role still running after {grace}s; SIGKILL")
        self._signal_role(signal.SIGKILL)
        self.role.wait()

    def requeue(self) -> bool:
        """After the warning signal: put this job back in the queue where the site allows it.

        On preemption Slurm (PreemptMode=REQUEUE) would requeue it too; ahead of the time limit
        nobody else will, so the supervisor asks. SIGTERM alone (a site that sends no user
        signal, or a plain scancel) is left to Slurm's own decision.
        """
        if not self.plan.preemption.requeue or self.job_id == "nojob":
            self.event("not-requeued", "requeue not allowed by the site profile")
            return False
        try:
            res = subprocess.run(
                ["scontrol", "requeue", self.job_id],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log(f"scontrol requeue failed: {exc}")
            self.event("requeue-failed", str(exc))
            return False
        if res.returncode == 0:
            log(f"requeued job {self.job_id} (scontrol requeue)")
            self.event("requeued", "scontrol requeue")
            return True
        msg = (res.stderr or res.stdout).strip()
        log(f"scontrol requeue refused: {msg}")
        self.event("requeue-failed", msg)
        return False

    def wait_for_the_end(self, limit: float) -> None:
        """Not requeued: stay until Slurm ends the job (TERM at preemption's GraceTime or at the
        time limit), so its final state says what happened (PREEMPTED, TIMEOUT) and `hpcfed
        rejoin` can tell a lost role from one that finished. `limit` bounds the wait."""
        log("role stopped; waiting for Slurm to end the job (preemption or time limit)")
        deadline = time.monotonic() + limit
        while not self.terminating and time.monotonic() < deadline:
            time.sleep(0.2)

    def running_role(self) -> subprocess.Popen:
        """The role's process, once start_role has started it."""
        assert self.role is not None, "the role was not started"
        return self.role

    def _signal_role(self, sig) -> None:
        try:
            os.killpg(self.running_role().pid, sig)
        except ProcessLookupError:
            pass

    def _wait_role(self, seconds: float) -> bool:
        try:
            self.running_role().wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()

    # (6) report
    def report(self, code: int, reason: str) -> None:
        record = {
            "job_id": self.job_id,
            "restart": self.restart,
            "exit_code": code,
            "reason": reason,
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = self.workdir / f"status-{self.job_id}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
        log(f"role ended: exit code {code} ({reason})")

    def run(self) -> int:
        log(
            f"deployment {self.plan.name} ({self.plan.deployment_id}) job {self.job_id} "
            f"restart {self.restart} on {os.environ.get('SLURMD_NODENAME') or os.uname().nodename}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
        )
        for sig in {
            signal.SIGTERM,
            signal.SIGINT,
            getattr(signal, f"SIG{self.plan.preemption.signal}"),
        }:
            signal.signal(sig, self.on_signal)
        self.event(
            "started" if self.restart == 0 else "running-again",
            f"on {os.environ.get('SLURMD_NODENAME') or os.uname().nodename}"
            + (f", restart {self.restart}" if self.restart else ""),
        )
        try:
            try:
                self.preflight_report = self.preflight()
            except GpuPreflightFailed as exc:
                self.report(EXIT_PREFLIGHT, f"GPU preflight failed: {exc}")
                return EXIT_PREFLIGHT
            try:
                self.start_tunnel()
            except TunnelError as exc:
                self.report(EXIT_TUNNEL, str(exc))
                return EXIT_TUNNEL
            if self.stop_reason:
                self.report(143, self.stop_reason)
                return 143
            try:
                ws = self.workspace()
                self.start_role(ws)
            except HpcfedError as exc:
                self.report(exc.exit_code, str(exc))
                return exc.exit_code
            while True:
                while self.running_role().poll() is None:
                    if self.stop_reason:
                        self.stop_role()
                        break
                    if self.tunnel is not None and self.tunnel.exited() is not None:
                        log(f"tunnel exited ({self.tunnel.reason()}); stopping the role")
                        self.stop_reason = "tunnel lost"
                        self.stop_role()
                        break
                    time.sleep(0.2)
                if not self.retry_role(ws):
                    break
            code = self.running_role().wait()
            if code < 0:  # killed by a signal: report it the shell's way
                code = 128 - code
            self.output_read()
            if self.failure is not None and not self.stop_reason:
                code = self.failure.exit_code
                self.report(code, self.failure.message)
                self.event("role-failed", f"{self.failure.message} (exit code {code})")
                return code
            self.report(code, self.stop_reason or "role exited")
            if self.stop_reason:
                took = time.monotonic() - self.stop_started
                self.event(
                    "role-stopped", f"{self.stop_reason}; role exit {code} after {took:.1f}s"
                )
                if self.stop_signal == getattr(signal, f"SIG{self.plan.preemption.signal}"):
                    if not self.requeue():
                        self.wait_for_the_end(self.plan.preemption.lead_time + 120)
            else:
                self.event("role-exited", f"exit code {code}")
            return code
        finally:
            self.stop_tunnel()


def run_plan(plan_path: str) -> int:
    path = Path(plan_path).resolve()
    try:
        plan = Plan.from_json(path.read_text())
    except ValueError as exc:  # pydantic's ValidationError is one: a plan from another version
        errors = exc.errors() if hasattr(exc, "errors") else []
        why = (
            f"{'.'.join(str(x) for x in errors[0]['loc'])}: {errors[0]['msg']}"
            if errors
            else str(exc)
        )
        raise ConfigError(f"{path}: not a plan this hpcfed can run ({why})") from None
    return Supervisor(plan, path.parent).run()
