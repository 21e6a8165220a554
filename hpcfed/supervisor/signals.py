"""The signals that end a job, and which end each one means.

Slurm sends the site's warning signal (`--signal=B:SIG@lead`, e.g. USR2) ahead of both
preemption and the time limit, and SIGTERM when it ends the job (scancel, preemption's
GraceTime, the time limit itself). The handler only records what it saw; the supervisor's loop
acts on it, so nothing runs inside a signal handler but an assignment and a log line. The clock
and the sleep are injected: tests call `handle()` and need no real signal and no real waiting.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

from hpcfed.supervisor.records import log

PREEMPTION = "preemption"
TIME_LIMIT = "time-limit"
CANCEL = "cancel"  # SIGTERM/SIGINT: Slurm (or a user) is ending the job now
TUNNEL_LOST = "tunnel-lost"

# slurmctld checks its timers about every 30 s, so the warning may come that much late.
SLURMCTLD_LAG = 30
POLL = 0.2  # seconds between looks at a flag a signal handler may set


@dataclass(frozen=True)
class Stop:
    """Why the role is being stopped."""

    reason: str  # for the log, the exit report and the events
    kind: str  # PREEMPTION | TIME_LIMIT | CANCEL | TUNNEL_LOST
    at: float  # the handler's clock when it was asked

    @property
    def warned(self) -> bool:
        """The warning signal: the job may outlive the role (requeue, or wait for Slurm)."""
        return self.kind in (PREEMPTION, TIME_LIMIT)


class SignalHandler:
    def __init__(
        self,
        warning: str,
        time_limit: float,
        lead_time: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.warning = getattr(signal, f"SIG{warning}")
        self.time_limit = time_limit
        self.lead_time = lead_time
        self.clock = clock
        self.sleep = sleep
        self.started = clock()  # this run of the job (a requeued job starts afresh)
        self.stop: Optional[Stop] = None  # the first reason to stop; later ones change nothing
        self.terminating = False  # SIGTERM/SIGINT seen: Slurm is ending the job now

    def install(self, install: Callable[..., object] = signal.signal) -> None:
        for signum in {signal.SIGTERM, signal.SIGINT, self.warning}:
            install(signum, self.handle)

    def handle(self, signum: int, _frame: object = None) -> None:
        if signum != self.warning:
            self.terminating = True
        if self.stop is not None:
            return
        name = signal.Signals(signum).name
        if signum == self.warning:
            kind = self.which_end()
            where = f"time limit in about {self.left()}s" if kind == TIME_LIMIT else kind
            reason = f"{name}: preemption or time limit ahead ({where})"
        else:
            kind, reason = CANCEL, f"{name}: job is being stopped"
        self.stop = Stop(reason, kind, self.clock())
        log(f"received {reason}; stopping the role")

    def stop_for(self, reason: str, kind: str) -> Stop:
        """A reason to stop that is no signal (the tunnel lost its hub)."""
        if self.stop is None:
            self.stop = Stop(reason, kind, self.clock())
        return self.stop

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> int:
        return max(0, int(self.time_limit - self.elapsed()))

    def which_end(self) -> str:
        """Slurm sends the same warning for both; the time already run tells them apart."""
        if self.time_limit - self.elapsed() <= self.lead_time + SLURMCTLD_LAG:
            return TIME_LIMIT
        return PREEMPTION

    def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, cut short by a reason to stop. True: nothing asked to stop."""
        deadline = self.clock() + seconds
        while self.clock() < deadline and self.stop is None:
            self.sleep(POLL)
        return self.stop is None

    def wait_for_the_end(self, limit: float) -> None:
        """Not requeued: stay until Slurm ends the job (TERM at preemption's GraceTime or at the
        time limit), so its final state says what happened (PREEMPTED, TIMEOUT) and `hpcfed
        rejoin` can tell a lost role from one that finished. `limit` bounds the wait."""
        log("role stopped; waiting for Slurm to end the job (preemption or time limit)")
        deadline = self.clock() + limit
        while not self.terminating and self.clock() < deadline:
            self.sleep(POLL)
