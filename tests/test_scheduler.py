"""The Slurm CLI backend's parsers on canned (and malformed) output, the backend against the
real cluster, and the deployment store under concurrent writers (as from two login nodes)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from hpcfed.deploy import wait_while_completing
from hpcfed.errors import SubmitRejected
from hpcfed.scheduler import GONE, JobInfo
from hpcfed.scheduler import slurm_cli as sc
from hpcfed.state import Deployment, DeploymentStore
from hpcfed.state.lock import lease_lock


def test_parse_submit():
    assert sc.parse_submit("123\n") == "123"
    assert sc.parse_submit("456;cluster1\n") == "456"
    with pytest.raises(SubmitRejected):
        sc.parse_submit("sbatch: error: something\n")
    with pytest.raises(SubmitRejected):
        sc.parse_submit("")


def test_parse_squeue_including_malformed_lines():
    out = "12|RUNNING|None|hpcfed-a|node1|1:02\n13|PENDING|Resources|hpcfed-b||0:00\ngarbage\n\n"
    jobs = sc.parse_squeue(out)
    assert set(jobs) == {"12", "13"}
    assert jobs["12"].state == "RUNNING" and jobs["12"].reason == "" and jobs["12"].active
    assert jobs["13"].reason == "Resources"


def test_parse_sacct_last_record_wins_and_states_are_normalised():
    out = (
        "20|REQUEUED|None|hpcfed-a|node1|00:01:00|0:0\n"
        "20|CANCELLED by 0|None|hpcfed-a|node2|00:00:30|0:15\n"
        "21|PREEMPTED|None|hpcfed-b|None assigned|00:00:00|0:0\n"
        "bad line\n"
    )
    jobs = sc.parse_sacct(out)
    assert jobs["20"].state == "CANCELLED" and jobs["20"].node == "node2" and not jobs["20"].active
    assert jobs["21"].node == ""


def test_find_looks_at_the_users_own_jobs_only():
    # the sbatch-timeout fallback and rejoin's adoption both go through it
    argv = sc.find_command("hpcfed-a")
    assert "--me" in argv and "--name=hpcfed-a" in argv


def test_parse_find_matches_the_comment_marker_only():
    out = "31|hpcfed:a:other\n32|hpcfed:a:abc\n104|hpcfed:a:abc\n"
    assert sc.parse_find(out, "hpcfed:a:abc") == "104"  # the newest
    assert sc.parse_find(out, "hpcfed:a:zzz") is None


def test_unreachable_patterns():
    assert sc.UNREACHABLE.search(
        "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    )
    assert not sc.UNREACHABLE.search("slurm_load_jobs error: Invalid job id specified")


@pytest.mark.slurm
class RecordedScheduler:
    """Answers a job's state from a list, one per query (the last one repeats)."""

    def __init__(self, states):
        self.states = list(states)
        self.queries = 0

    def query(self, job_ids):
        state = self.states[min(self.queries, len(self.states) - 1)]
        self.queries += 1
        return {j: JobInfo(job_id=j, state=state) for j in job_ids}


class StepClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.mark.parametrize(
    "states, end_state, queries",
    [
        (["COMPLETING", "COMPLETING", "CANCELLED"], "CANCELLED", 3),  # cancel, then submit: waits
        (["RUNNING"], "RUNNING", 1),  # still running: refused at once, no waiting
        (["PENDING"], "PENDING", 1),
        (["COMPLETED"], "COMPLETED", 1),
        (["COMPLETING"], "COMPLETING", 121),  # stuck completing: gives up after the limit
    ],
)
def test_submit_waits_only_for_a_completing_job(states, end_state, queries):
    clock = StepClock()
    scheduler = RecordedScheduler(states)
    said = []
    info = wait_while_completing(
        scheduler, "83", said.append, limit_s=120, clock=clock, sleep=clock.sleep
    )
    assert info.state == end_state
    assert scheduler.queries == queries
    assert len(said) == queries - 1 and all("job 83" in m for m in said)


def test_query_is_batched_and_unknown_ids_are_gone(slurm_cluster):
    from hpcfed.runner.local import LocalRunner

    cli = sc.SlurmCli(LocalRunner(), env=slurm_cluster.env)
    script = "#!/bin/sh\n#SBATCH --output=/dev/null\ntrue\n"
    marker = f"hpcfed:sched-test:{uuid.uuid4().hex[:8]}"
    job_id = cli.submit(script, job_name="hpcfed-sched-test", comment=marker)
    calls = cli.calls()
    jobs = cli.query([job_id, "999999"])
    # one squeue for both; one sacct for the one squeue did not know
    assert cli.calls() - calls == 2
    assert jobs[job_id].state in {"PENDING", "RUNNING", "COMPLETING", "COMPLETED", "CONFIGURING"}
    assert jobs["999999"].state == GONE
    assert cli.find("hpcfed-sched-test", marker) == job_id
    assert cli.find("hpcfed-sched-test", "hpcfed:sched-test:other") is None


def _append_event(args):
    root, i = args
    store = DeploymentStore(root)
    store.update("shared", lambda d: d.add_event("writer", str(i)))


def test_store_survives_concurrent_read_modify_write(tmp_path):
    """20 processes (think: several login nodes) updating one deployment lose no update."""
    store = DeploymentStore(tmp_path / "deployments")
    store.put(
        Deployment(
            name="shared",
            deployment_id="x",
            site="local",
            role="client",
            framework="nvflare",
            plan={},
        )
    )
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_append_event, [(tmp_path / "deployments", i) for i in range(20)])
    dep = store.require("shared")
    assert sorted(int(e["detail"]) for e in dep.events) == list(range(20))
    # no temporary or lock files left, records private
    left = sorted(p.name for p in (tmp_path / "deployments").iterdir())
    assert left == ["shared.json"]
    assert oct(os.stat(tmp_path / "deployments" / "shared.json").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "deployments").st_mode & 0o777) == "0o700"


def test_stale_lock_is_broken_after_its_lease(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"holder": "crashed"}))
    old = time.time() - 120
    os.utime(lock, (old, old))
    with lease_lock(lock, lease=60, wait=1) as token:
        assert json.loads(lock.read_text())["holder"] == token
    assert not lock.exists()


def test_live_lock_is_waited_for_then_refused(tmp_path):
    from hpcfed.errors import EnvironmentProblem

    lock = tmp_path / "x.lock"
    with lease_lock(lock, lease=60):
        with pytest.raises(EnvironmentProblem, match="held by another hpcfed"):
            with lease_lock(lock, lease=60, wait=0.3):
                pass


def _hold(lock, seconds, lease, out):
    with lease_lock(Path(lock), lease=lease, wait=5):
        Path(out).write_text("in")
        time.sleep(seconds)
        Path(out).write_text("out")


def _start_holder(tmp_path, seconds, lease):
    lock, out = tmp_path / "x.lock", tmp_path / "where"
    holder = multiprocessing.get_context("fork").Process(
        target=_hold, args=(str(lock), seconds, lease, str(out))
    )
    holder.start()
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text() == "in"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return holder, lock, out


def test_a_live_holder_keeps_its_lock_however_long_it_holds_it(tmp_path):
    """The holder renews its lease: held for six of its leases, it is never broken (a waiter
    used to break a lock older than the waiter's own lease, and a cancel got lost)."""
    holder, lock, out = _start_holder(tmp_path, seconds=3.0, lease=0.5)
    with lease_lock(lock, lease=0.1, wait=20):  # the waiter's lease is not the holder's
        assert out.read_text() == "out"  # entered only once the holder was done
    holder.join()


def test_a_killed_holder_of_this_machine_is_overtaken_at_once(tmp_path):
    holder, lock, out = _start_holder(tmp_path, seconds=60, lease=600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with lease_lock(lock, lease=600, wait=5):  # its pid is gone: no need to wait out its lease
        assert out.read_text() == "in"


def _foreign_lock(path, lease, renewed_ago):
    path.write_text(json.dumps({"holder": "h", "lease": lease, "host": "elsewhere", "pid": 1}))
    then = time.time() - renewed_ago
    os.utime(path, (then, then))


def test_the_holders_lease_decides_not_the_waiters(tmp_path):
    """A holder on another login node: only its own lease (renewals stopped that long ago)
    lets a waiter take over."""
    from hpcfed.errors import EnvironmentProblem

    lock = tmp_path / "x.lock"
    _foreign_lock(lock, lease=1.0, renewed_ago=5)
    with lease_lock(lock, lease=600, wait=1):  # its 1 s lease is over: broken
        pass
    _foreign_lock(lock, lease=600.0, renewed_ago=120)
    with pytest.raises(EnvironmentProblem, match="held by another hpcfed"):
        with lease_lock(lock, lease=60, wait=0.3):  # 120 s > the waiter's 60 s: still alive
            pass


def _stale_breaker(args):
    lock, out = args
    with lease_lock(Path(lock), lease=5, wait=10) as token:
        with open(out, "a") as f:
            f.write(f"in {token}\n")
            f.flush()
        time.sleep(0.2)
        with open(out, "a") as f:
            f.write(f"out {token}\n")


def test_racing_stale_lock_breakers_still_exclude_each_other(tmp_path):
    """Many processes find the same stale lock at once: they still enter one at a time."""
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"holder": "crashed"}))
    old = time.time() - 120
    os.utime(lock, (old, old))
    out = tmp_path / "trace"
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_stale_breaker, [(str(lock), str(out))] * 8)
    lines = out.read_text().splitlines()
    assert len(lines) == 16
    for i in range(0, 16, 2):  # strictly in/out pairs of the same holder: never two inside
        assert lines[i].startswith("in ") and lines[i + 1] == "out " + lines[i][3:]
