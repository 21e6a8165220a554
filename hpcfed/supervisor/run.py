"""The supervisor's one job, step by step (see the package docstring): it composes what Slurm
tells the job (job_environment), the signals that end it (signals), the steps before the role
(prepare) and the role's process (role_process)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from hpcfed.errors import ConfigError, ExitCode, GpuPreflightFailed, HpcfedError, TunnelError
from hpcfed.plan import Plan
from hpcfed.supervisor import prepare
from hpcfed.supervisor.job_environment import JobEnvironment, JobPaths, requeue
from hpcfed.supervisor.records import Records, log
from hpcfed.supervisor.role_process import (
    RETRY_PAUSE,
    RoleProcess,
    failure_exit,
    failures_of,
    retryable,
    role_command,
)
from hpcfed.supervisor.signals import POLL, TUNNEL_LOST, SignalHandler
from hpcfed.tunnel.job import TunnelChild

# Without a requeue the job waits for Slurm's SIGTERM; this long past the warning's lead time
# it stops waiting (slurmctld is late, or the site sends no TERM).
END_WAIT_MARGIN = 120


class RoleNotStarted(HpcfedError):
    """The role's program could not be started at all."""

    exit_code = ExitCode.ROLE_FAILED


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        workdir: Path,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.plan = plan
        self.workdir = workdir
        self.environ = environ  # what the role inherits
        self.env = JobEnvironment.read(environ, plan.preemption.requeue)
        self.paths = JobPaths(workdir, self.env.job_id)
        self.records = Records(self.env, self.paths)
        p = plan.preemption
        self.signals = SignalHandler(
            p.signal, plan.resources.time_seconds, p.lead_time, clock=clock, sleep=sleep
        )
        self.tunnel: Optional[TunnelChild] = None
        self.role: Optional[RoleProcess] = None

    def run(self) -> int:
        env = self.env
        log(
            f"deployment {self.plan.name} ({self.plan.deployment_id}) job {env.job_id} "
            f"restart {env.restart} on {env.node}; CUDA_VISIBLE_DEVICES={env.gpus}"
        )
        self.signals.install()
        self.records.event(
            "started" if env.restart == 0 else "running-again",
            f"on {env.node}" + (f", restart {env.restart}" if env.restart else ""),
        )
        try:
            return self.supervise()
        finally:
            if self.tunnel is not None:
                self.tunnel.stop()

    def supervise(self) -> int:
        try:
            report = prepare.preflight(self.plan)
        except GpuPreflightFailed as exc:
            return self.end(ExitCode.PREFLIGHT, f"GPU preflight failed: {exc}")
        try:
            self.bring_up_tunnel()
        except TunnelError as exc:
            return self.end(ExitCode.TUNNEL, str(exc))
        if self.signals.stop is not None:
            return self.end(ExitCode.STOPPED, self.signals.stop.reason)
        try:
            ws = prepare.workspace(self.plan, self.workdir, report)
            self.role = self.start_role(ws)
            while self.watch() and self.retry():
                self.role = self.start_role(ws)
        except HpcfedError as exc:
            return self.end(exc.exit_code, str(exc))
        return self.finish(self.role)

    def end(self, code: int, reason: str) -> int:
        """The job ends without a role to wait for (it never started, or could not again)."""
        self.records.report(code, reason)
        return code

    def bring_up_tunnel(self) -> None:
        self.tunnel = prepare.start_tunnel(self.plan, self.paths)
        if self.tunnel is not None:
            prepare.wait_tunnel(self.tunnel, self.plan, lambda: self.signals.stop is not None)

    def start_role(self, ws: Path) -> RoleProcess:
        plan = self.plan
        argv, env = role_command(plan, self.paths, ws, self.environ)
        log(f"starting {plan.framework} {plan.role} in {ws}: {' '.join(argv)}")
        try:
            return RoleProcess.start(argv, env, ws, plan.framework, plan.role, failures_of(plan))
        except OSError as exc:  # the program (apptainer, the framework's) is not there
            raise RoleNotStarted(f"cannot start {plan.framework} {plan.role}: {exc}") from None

    def watch(self) -> bool:
        """Until the role exits (True) or must be stopped: then stop it (False)."""
        role = self.running_role()
        while role.poll() is None:
            stop = self.signals.stop
            if stop is None and self.tunnel is not None and self.tunnel.exited() is not None:
                log(f"tunnel exited ({self.tunnel.reason()}); stopping the role")
                stop = self.signals.stop_for("tunnel lost", TUNNEL_LOST)
            if stop is not None:
                p = self.plan.preemption
                role.stop(self.plan.stop_command, p.grace, self.workdir)
                return False
            self.signals.sleep(POLL)
        return True

    def retry(self) -> bool:
        """The role exited by itself in a way that passes: start it again after a pause?"""
        role = self.running_role()
        role.output_read()
        f = role.failure
        if f is None or self.signals.stop is not None or not retryable(f, self.signals.elapsed()):
            return False
        log(f"retrying in {RETRY_PAUSE}s (for up to {f.retry_for}s since the job started)")
        return self.signals.pause(RETRY_PAUSE)

    def finish(self, role: Optional[RoleProcess]) -> int:
        """The role has ended: report, record, and - after the warning signal - requeue."""
        assert role is not None
        code = role.exit_code()
        stop = self.signals.stop
        if role.failure is not None and stop is None:
            exit_code, reason = failure_exit(role.failure, self.plan.framework)
            self.records.report(exit_code, reason, framework_code=role.failure.code)
            self.records.event("role-failed", f"{reason} (exit code {exit_code})")
            return exit_code
        self.records.report(code, stop.reason if stop else "role exited")
        if stop is None:
            self.records.event("role-exited", f"exit code {code}")
            return code
        took = self.signals.clock() - stop.at
        self.records.event("role-stopped", f"{stop.reason}; role exit {code} after {took:.1f}s")
        if stop.warned and not self.requeue():
            self.signals.wait_for_the_end(self.plan.preemption.lead_time + END_WAIT_MARGIN)
        return code

    def requeue(self) -> bool:
        """After the warning signal: put this job back in the queue where the site allows it.

        On preemption Slurm (PreemptMode=REQUEUE) would requeue it too; ahead of the time limit
        nobody else will, so the supervisor asks. SIGTERM alone (a site that sends no user
        signal, or a plain scancel) is left to Slurm's own decision.
        """
        if not self.env.requeue_allowed:
            self.records.event("not-requeued", "requeue not allowed by the site profile")
            return False
        outcome, detail = requeue(self.env.job_id)
        if outcome == "requeued":
            log(f"requeued job {self.env.job_id} ({detail})")
            self.records.event("requeued", detail)
            return True
        log(f"scontrol requeue {outcome}: {detail}")  # failed (could not ask) or refused
        self.records.event("requeue-failed", detail)
        return False

    def running_role(self) -> RoleProcess:
        assert self.role is not None, "the role was not started"
        return self.role


def run_plan(plan_path: str) -> int:
    path = Path(plan_path).resolve()
    try:
        plan = Plan.from_json(path.read_text())
    except ValueError as exc:  # hpcfed.model's ValidationError is one: a plan from another version
        errors = exc.errors() if hasattr(exc, "errors") else []
        why = (
            f"{'.'.join(str(x) for x in errors[0]['loc'])}: {errors[0]['msg']}"
            if errors
            else str(exc)
        )
        raise ConfigError(f"{path}: not a plan this hpcfed can run ({why})") from None
    return Supervisor(plan, path.parent).run()
