"""What the job leaves behind: log lines, events, and its exit report."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from hpcfed.supervisor.job_environment import JobEnvironment, JobPaths


def log(message: str) -> None:
    """One line in the job's log; `[hpcfed-job` tells hpcfed's lines from the role's."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[hpcfed-job {stamp}] {message}", file=sys.stderr, flush=True)


class Records:
    def __init__(self, env: JobEnvironment, paths: JobPaths):
        self.env = env
        self.paths = paths

    def event(self, kind: str, detail: str = "") -> None:
        """Append to events.jsonl in the deployment directory (`hpcfed status NAME` shows it).
        One short line per write with O_APPEND, so concurrent writers never interleave."""
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": kind,
            "detail": detail,
            "job_id": self.env.job_id,
            "restart": self.env.restart,
            "source": "job",
        }
        line = json.dumps(record) + "\n"
        try:
            fd = os.open(self.paths.events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log(f"cannot record event {kind}: {exc}")

    def report(self, code: int, reason: str, framework_code: Optional[int] = None) -> None:
        """status-JOBID.json (written whole, then renamed: a reader never sees half) and the
        one line in the log that says how the job ended."""
        record = {
            "job_id": self.env.job_id,
            "restart": self.env.restart,
            "exit_code": int(code),
            "reason": reason,
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if framework_code is not None:
            record["framework_exit_code"] = framework_code
        path = self.paths.status
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
        log(f"role ended: exit code {int(code)} ({reason})")
