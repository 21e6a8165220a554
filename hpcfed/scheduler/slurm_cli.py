"""The Slurm CLI backend: sbatch --parsable, squeue/sacct machine output, scancel.

Command builders and output parsers are pure functions (tested on canned output); SlurmCli
runs them through a runner (local or SSH). Status is one squeue call for all jobs, plus one sacct
call for those squeue no longer knows.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from hpcfed.errors import EnvironmentProblem, SchedulerUnavailable, SubmitRejected
from hpcfed.runner import Result, Runner
from hpcfed.scheduler import GONE, JobInfo

SEP = "|"
SQUEUE_FIELDS = "%i|%T|%r|%j|%N|%M"
SACCT_FIELDS = "JobIDRaw,State,Reason,JobName,NodeList,Elapsed,ExitCode"

# Messages meaning "the controller did not answer" (state unknown), not "no such job".
UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Connection refused|"
    r"Zero Bytes were transmitted|Communication connection failure|"
    r"Unable to establish connection|Transport endpoint|slurm_load_jobs error: Unexpected",
    re.I,
)
NO_ACCOUNTING = re.compile(
    r"accounting storage is disabled|Problem talking to the database|"
    r"slurmdbd",
    re.I,
)


def submit_command(job_name: str, comment: str) -> List[str]:
    # Name and marker also on the command line: ownership never depends on the template.
    return ["sbatch", "--parsable", f"--job-name={job_name}", f"--comment={comment}"]


def parse_submit(stdout: str) -> str:
    """`123` or `123;cluster` -> `123`."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";")[0].strip()
    if not job_id.isdigit():
        raise SubmitRejected(f"sbatch gave no job id (output: {stdout.strip()[:200]!r})")
    return job_id


def squeue_command(job_ids: Iterable[str]) -> List[str]:
    return [
        "squeue",
        "--noheader",
        "--states=all",
        f"--format={SQUEUE_FIELDS}",
        f"--jobs={','.join(job_ids)}",
    ]


def parse_squeue(stdout: str) -> Dict[str, JobInfo]:
    jobs: Dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split(SEP)
        if len(parts) < 6 or not parts[0]:
            continue
        job_id, state, reason, name, node, elapsed = parts[:6]
        state = state.strip().upper().split()[0] if state.strip() else "UNKNOWN"
        jobs[job_id.strip()] = JobInfo(
            job_id=job_id.strip(),
            state=state,
            reason="" if reason == "None" else reason,
            name=name,
            node=node,
            elapsed=elapsed,
            source="squeue",
        )
    return jobs


def sacct_command(job_ids: Iterable[str]) -> List[str]:
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        "--duplicates",
        f"--format={SACCT_FIELDS}",
        f"--jobs={','.join(job_ids)}",
    ]


def parse_sacct(stdout: str) -> Dict[str, JobInfo]:
    """One JobInfo per job id; with --duplicates (requeued jobs) the last record wins."""
    jobs: Dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split(SEP)
        if len(parts) < 7 or not parts[0]:
            continue
        job_id, state, reason, name, node, elapsed, exit_code = parts[:7]
        # "CANCELLED by 0" -> CANCELLED
        state = state.strip().upper().split()[0] if state.strip() else "UNKNOWN"
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state,
            reason="" if reason == "None" else reason,
            name=name,
            node="" if node == "None assigned" else node,
            elapsed=elapsed,
            exit_code=exit_code,
            source="sacct",
        )
    return jobs


def cancel_command(job_id: str, signal: Optional[str] = None) -> List[str]:
    argv = ["scancel"]
    if signal:
        argv.append(f"--signal={signal}")
    return argv + [job_id]


def find_command(job_name: str) -> List[str]:
    # --me: names and comments are free text, so only the user's own jobs can be proof.
    return [
        "squeue",
        "--noheader",
        "--me",
        "--states=all",
        f"--name={job_name}",
        "--format=%i|%k",
    ]


def parse_find(stdout: str, comment: str) -> Optional[str]:
    """The newest job carrying our marker (a resubmitted deployment has several)."""
    found = []
    for line in stdout.splitlines():
        job_id, _, job_comment = line.strip().partition(SEP)
        if job_comment.strip() == comment and job_id.strip().isdigit():
            found.append(int(job_id))
    return str(max(found)) if found else None


def _error_text(res: Result) -> str:
    text = (res.stderr or res.stdout).strip()
    return text.splitlines()[-1] if text else f"exit code {res.returncode}"


class SlurmCli:
    def __init__(
        self, runner: Runner, env: Optional[Mapping[str, str]] = None, timeout: float = 30
    ) -> None:
        self.runner = runner
        self.env = dict(env or {})
        self.timeout = timeout
        self._calls = 0
        self.accounting: Optional[bool] = None  # learnt from the first sacct call

    def calls(self) -> int:
        return self._calls

    def _run(self, argv: Sequence[str], input: Optional[str] = None) -> Result:
        self._calls += 1
        res = self.runner.run(argv, env=self.env, input=input, timeout=self.timeout)
        if res.returncode != 0 and UNREACHABLE.search(res.stderr + res.stdout):
            raise SchedulerUnavailable(f"{argv[0]} on {self.runner.where}: {_error_text(res)}")
        return res

    def submit(self, script: str, *, job_name: str, comment: str) -> str:
        try:
            res = self._run(submit_command(job_name, comment), input=script)  # script on stdin
        except SchedulerUnavailable as exc:
            # An sbatch that timed out may still have been accepted: look before saying no.
            try:
                found = self.find(job_name, comment)
            except SchedulerUnavailable:
                found = None
            if found:
                return found
            raise SchedulerUnavailable(
                f"{exc} - the job was probably not submitted; `hpcfed status` will tell"
            ) from None
        if res.returncode != 0:
            raise SubmitRejected(f"sbatch on {self.runner.where}: {_error_text(res)}")
        return parse_submit(res.stdout)

    def query(self, job_ids: Iterable[str]) -> Dict[str, JobInfo]:
        ids = sorted({str(j) for j in job_ids}, key=lambda s: (len(s), s))
        if not ids:
            return {}
        res = self._run(squeue_command(ids))
        if res.returncode != 0 and "Invalid job id" not in res.stderr:
            raise SchedulerUnavailable(f"squeue on {self.runner.where}: {_error_text(res)}")
        jobs = parse_squeue(res.stdout) if res.returncode == 0 else {}
        missing = [j for j in ids if j not in jobs]
        if missing and self.accounting is not False:
            res = self._run(sacct_command(missing))
            if res.returncode == 0:
                self.accounting = True
                jobs.update({k: v for k, v in parse_sacct(res.stdout).items() if k in missing})
            elif NO_ACCOUNTING.search(res.stderr):
                self.accounting = False
            else:
                raise SchedulerUnavailable(f"sacct on {self.runner.where}: {_error_text(res)}")
        for j in ids:
            if j not in jobs:
                reason = (
                    "no record (ended; accounting off)" if self.accounting is False else "no record"
                )
                jobs[j] = JobInfo(job_id=j, state=GONE, reason=reason, source="-")
        return jobs

    def cancel(self, job_id: str, signal: Optional[str] = None) -> None:
        res = self._run(cancel_command(job_id, signal))
        if (
            res.returncode != 0
            and "Invalid job id" not in res.stderr
            and "already completing or completed" not in res.stderr
        ):
            raise SubmitRejected(f"scancel {job_id} on {self.runner.where}: {_error_text(res)}")

    def find(self, job_name: str, comment: str) -> Optional[str]:
        res = self._run(find_command(job_name))
        if res.returncode != 0:
            raise SchedulerUnavailable(f"squeue on {self.runner.where}: {_error_text(res)}")
        return parse_find(res.stdout, comment)

    def ping(self) -> str:
        """One line describing the controller, or SchedulerUnavailable."""
        res = self._run(["scontrol", "ping"])
        if res.returncode != 0 or "UP" not in res.stdout:
            raise SchedulerUnavailable(
                f"slurmctld on {self.runner.where} is not answering: {_error_text(res)}"
            )
        first: str = res.stdout.strip().splitlines()[0]
        return first

    def check(self, argv: Sequence[str]) -> Result:
        """Run any read-only scheduler command (doctor)."""
        return self._run(argv)


__all__ = ["SlurmCli", "EnvironmentProblem"]
