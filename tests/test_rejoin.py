"""`hpcfed rejoin` and `hpcfed cron`: a deployment lost in a way Slurm does not requeue comes back
exactly once - also with twenty rejoins at the same moment -, never on an unknown scheduler
answer, never after `hpcfed cancel`; the cron entry is installed once however often asked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import HPCFED, hpcfed, need, run, sbatch_wrapper, user_env

from hpcfed.rejoin import cron as c
from hpcfed.rejoin import decide
from hpcfed.scheduler import GONE, UNKNOWN, JobInfo
from hpcfed.state import Deployment
from hpcfed.state.store import now as stamp

# ---- the decision table (pure) ----


def dep(jobs=None, stopped=False, policy=None):
    return Deployment(
        name="d",
        deployment_id="x",
        site="local",
        role="client",
        framework="nvflare",
        plan={
            "rejoin": policy
            or {"backoff": 30, "max_backoff": 300, "max_resubmits": 3, "window": 3600}
        },
        jobs=jobs if jobs is not None else [{"job_id": "10", "submitted_at": stamp()}],
        stopped=stopped,
    )


@pytest.mark.parametrize(
    "state", ["PREEMPTED", "NODE_FAIL", "TIMEOUT", "CANCELLED", "BOOT_FAIL", GONE]
)
def test_lost_jobs_are_resubmitted(state):
    assert decide(dep(), JobInfo("10", state), time.time())[0] == "resubmit"


@pytest.mark.parametrize(
    "state,action",
    [
        ("RUNNING", "ok"),
        ("PENDING", "ok"),
        ("REQUEUED", "ok"),
        ("COMPLETED", "ended"),
        ("FAILED", "ended"),
        ("OUT_OF_MEMORY", "ended"),
        (UNKNOWN, "unknown"),
    ],
)
def test_other_states_are_not_resubmitted(state, action):
    assert decide(dep(), JobInfo("10", state), time.time())[0] == action


def test_stopped_on_purpose_is_left_alone_whatever_the_state():
    assert decide(dep(stopped=True), JobInfo("10", "CANCELLED"), time.time())[0] == "stopped"


def test_backoff_doubles_and_the_cap_holds():
    t = time.time()
    s = lambda dt: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t - dt))  # noqa: E731
    one = dep(
        [
            {"job_id": "10", "submitted_at": s(100)},
            {"job_id": "11", "submitted_at": s(10), "by": "rejoin"},
        ]
    )
    action, why = decide(one, JobInfo("11", "TIMEOUT"), t)
    assert action == "backoff" and "backoff 30s" in why
    assert decide(one, JobInfo("11", "TIMEOUT"), t + 25)[0] == "resubmit"
    two = dep(
        [
            {"job_id": "11", "submitted_at": s(200), "by": "rejoin"},
            {"job_id": "12", "submitted_at": s(40), "by": "rejoin"},
        ]
    )
    assert decide(two, JobInfo("12", "TIMEOUT"), t)[1].endswith("(backoff 60s)")
    three = dep([{"job_id": str(i), "submitted_at": s(1000 - i), "by": "rejoin"} for i in range(3)])
    assert decide(three, JobInfo("2", "TIMEOUT"), t)[0] == "gave-up"
    old = dep([{"job_id": str(i), "submitted_at": s(7200 + i), "by": "rejoin"} for i in range(3)])
    assert decide(old, JobInfo("0", "TIMEOUT"), t)[0] == "resubmit"  # outside the window


def test_the_users_own_submit_starts_the_count_again():
    """After rejoin gave up (or backed off), `hpcfed submit` - what its message says to do -
    starts afresh: the next loss is resubmitted at once, not given up on."""
    t = time.time()
    s = lambda dt: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t - dt))  # noqa: E731
    rejoins = [{"job_id": str(i), "submitted_at": s(900 - i), "by": "rejoin"} for i in range(3)]
    assert decide(dep(rejoins), JobInfo("2", "NODE_FAIL"), t)[0] == "gave-up"
    restarted = dep(rejoins + [{"job_id": "3", "submitted_at": s(20), "by": "submit"}])
    assert decide(restarted, JobInfo("3", "NODE_FAIL"), t)[0] == "resubmit"
    again = dep(rejoins + [{"job_id": "3", "submitted_at": s(60), "by": "submit"},
                           {"job_id": "4", "submitted_at": s(10), "by": "rejoin"}])  # fmt: skip
    assert decide(again, JobInfo("4", "NODE_FAIL"), t)[1].endswith("(backoff 30s)")


def test_cron_block_is_replaced_not_duplicated():
    other = "5 * * * * echo mine\n"
    first = c.strip(other) + c.block("scrontab", "10m", "/x/rejoin.log", ["--partition=debug"])
    second = c.strip("\n".join(first)) + c.block("scrontab", "15m", "/x/rejoin.log", [])
    text = "\n".join(second)
    assert text.count(c.MARK) == 1 and "*/15 * * * *" in text and "*/10" not in text
    assert text.startswith("5 * * * * echo mine") and "#SCRON --job-name=hpcfed-rejoin" in text
    assert c.strip(text) == ["5 * * * * echo mine"]
    assert c.schedule("2h") == "0 */2 * * *" and c.schedule("60m") == "0 * * * *"


# ---- against the real cluster ----


@pytest.fixture()
def user_state(slurm_cluster):
    """An own state directory for the cluster user: rejoin must see only this test's deployments."""
    d = tempfile.mkdtemp(prefix="hpcfed-rejoin-")
    shutil.chown(d, user=slurm_cluster.user)
    yield {"XDG_STATE_HOME": d}
    shutil.rmtree(d, ignore_errors=True)


def as_user(cluster, env, *args, timeout=120):
    return hpcfed(*args, user=cluster.user, env=env, timeout=timeout)


def submit_sleeper(cluster, env):
    name = f"rj-{uuid.uuid4().hex[:6]}"
    proc = as_user(
        cluster,
        env,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        "sleep 600",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return name, json.loads(proc.stdout)["job_id"]


def our_active_jobs(name):
    out = run(
        [
            "squeue",
            "--noheader",
            f"--name=hpcfed-{name}",
            "--states=PENDING,RUNNING,CONFIGURING",
            "--format=%i",
        ]
    ).stdout
    return sorted(out.split())


def admin_cancel(job_id):
    """Cancelled by someone else with rights (root): Slurm does not requeue it."""
    assert run(["scancel", job_id]).returncode == 0
    deadline = time.monotonic() + 30
    while run(
        [
            "squeue",
            "--noheader",
            "-j",
            job_id,
            "--states=PENDING,RUNNING,COMPLETING,CONFIGURING",
            "--format=%i",
        ]
    ).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_twenty_concurrent_rejoins_resubmit_exactly_once(slurm_cluster, user_state):
    name, job_id = submit_sleeper(slurm_cluster, user_state)
    admin_cancel(job_id)
    env = dict(os.environ, **user_env(slurm_cluster.user))
    env.update(user_state)
    procs = [
        subprocess.Popen(
            ["runuser", "-u", slurm_cluster.user, "--"] + HPCFED + ["rejoin", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(20)
    ]
    results = [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _, _ in results), [r for r in results if r[0]]
    actions = [json.loads(out)["deployments"][0]["action"] for _, out, _ in results]
    assert actions.count("resubmitted") == 1, actions
    assert set(actions) <= {"resubmitted", "busy", "ok", "backoff"}, actions
    new_jobs = our_active_jobs(name)
    assert len(new_jobs) == 1 and new_jobs[0] != job_id
    status = json.loads(as_user(slurm_cluster, user_state, "status", name, "--json").stdout)[
        "deployments"
    ][0]
    assert [j["job_id"] for j in status["jobs"]] == [job_id, new_jobs[0]]
    assert any(e["event"] == "resubmitted" and "CANCELLED" in e["detail"] for e in status["events"])

    # cancelled on purpose: never resubmitted
    assert as_user(slurm_cluster, user_state, "cancel", name).returncode == 0
    proc = as_user(slurm_cluster, user_state, "rejoin", "--json")
    assert json.loads(proc.stdout)["deployments"][0]["action"] == "stopped"
    assert our_active_jobs(name) == []

    # `submit` of the same name resumes the same deployment (and rejoin looks after it again)
    before = json.loads(as_user(slurm_cluster, user_state, "status", name, "--json").stdout)[
        "deployments"
    ][0]
    record = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
    first_id = json.loads(record.read_text())["deployment_id"]
    proc = as_user(
        slurm_cluster,
        user_state,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        "sleep 600",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["deployment_id"] == first_id
    after = json.loads(as_user(slurm_cluster, user_state, "status", name, "--json").stdout)[
        "deployments"
    ][0]
    assert after["stopped"] is False and len(after["jobs"]) == len(before["jobs"]) + 1
    assert as_user(slurm_cluster, user_state, "cancel", name).returncode == 0


@pytest.fixture()
def slow_sbatch():
    """A PATH entry whose `sbatch` waits 8 s, then submits for real: a busy slurmctld, which
    holds one rejoin between its recorded intent and its record."""
    with sbatch_wrapper('sleep 8\nexec "$REAL" "$@"') as path:
        yield path


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_a_rejoin_meeting_another_ones_submit_in_progress_is_busy_not_unknown(
    slurm_cluster, user_state, slow_sbatch
):
    """Seen in a fresh-machine run of the twenty concurrent rejoins: one read the record while
    another was inside its sbatch (intent recorded, lock held), called that submit interrupted,
    and exited 4 ("scheduler unreachable"); a cron pass would have mailed an error. It is busy:
    exit 0, nothing submitted by it; the holder's one resubmission stands."""
    name, job_id = submit_sleeper(slurm_cluster, user_state)
    admin_cancel(job_id)
    env = dict(os.environ, **user_env(slurm_cluster.user))
    env.update(user_state)
    first = subprocess.Popen(
        ["runuser", "-u", slurm_cluster.user, "--"] + HPCFED + ["rejoin", "--json"],
        env=dict(env, PATH=slow_sbatch),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        record = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
        deadline = time.monotonic() + 60
        while not json.loads(record.read_text()).get("pending"):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        proc = as_user(slurm_cluster, user_state, "rejoin", "--json")
        assert proc.returncode == 0, proc.stderr
        (row,) = json.loads(proc.stdout)["deployments"]
        assert (row["action"], row["detail"]) == ("busy", "another hpcfed is handling it right now")
    finally:
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    (row,) = json.loads(out)["deployments"]
    assert row["action"] == "resubmitted", row
    new_jobs = our_active_jobs(name)
    assert len(new_jobs) == 1 and new_jobs[0] == row["new_job_id"], (new_jobs, row)
    assert as_user(slurm_cluster, user_state, "cancel", name).returncode == 0


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_stopped_slurmctld_resubmits_nothing_then_rejoin_resumes(slurm_cluster, user_state):
    """The real controller stopped: rejoin must not read that as 'job gone'."""
    from hpcfed.testcluster.cluster import TestCluster
    from hpcfed.testcluster.spec import ClusterSpec

    name, job_id = submit_sleeper(slurm_cluster, user_state)
    admin_cancel(job_id)
    survivor, survivor_job = submit_sleeper(slurm_cluster, user_state)  # must outlive the outage
    state_file = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
    cluster = TestCluster(ClusterSpec(prefix=slurm_cluster.prefix))
    assert cluster.stop_daemon("slurmctld")
    try:
        proc = as_user(slurm_cluster, user_state, "rejoin", "--json", timeout=180)
        assert proc.returncode == 4, proc.stderr
        assert "scheduler unreachable" in proc.stderr and "nothing resubmitted" in proc.stderr
        actions = {d["name"]: d["action"] for d in json.loads(proc.stdout)["deployments"]}
        assert actions[name] == "unknown" and actions[survivor] == "unknown"
        assert len(json.loads(state_file.read_text())["jobs"]) == 1
    finally:
        up = hpcfed("testcluster", "up", "--json", timeout=300)
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["started"] == ["slurmctld"]  # only what was down
    assert our_active_jobs(survivor) == [survivor_job]  # the running job lived through it
    proc = as_user(slurm_cluster, user_state, "rejoin", "--json")
    assert proc.returncode == 0, proc.stderr
    actions = {d["name"]: d["action"] for d in json.loads(proc.stdout)["deployments"]}
    assert actions[name] == "resubmitted" and actions[survivor] == "ok"
    assert len(our_active_jobs(name)) == 1
    for n in (name, survivor):
        as_user(slurm_cluster, user_state, "cancel", n)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_dry_run_says_and_submits_nothing(slurm_cluster, user_state):
    name, job_id = submit_sleeper(slurm_cluster, user_state)
    admin_cancel(job_id)
    proc = as_user(slurm_cluster, user_state, "rejoin", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["deployments"][0]["action"] == "would-resubmit"
    assert our_active_jobs(name) == []
    as_user(slurm_cluster, user_state, "cancel", name)


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_cron_install_twice_leaves_one_entry(slurm_cluster, user_state):
    need(
        shutil.which("crontab") is not None,
        "crontab not installed (scripts/bootstrap.d/46-cron.sh)",
    )
    user = slurm_cluster.user
    before = run(["crontab", "-l"], user=user).stdout
    try:
        for every in ("10m", "5m"):
            proc = as_user(
                slurm_cluster, user_state, "cron", "install", "--every", every, "--crontab"
            )
            assert proc.returncode == 0, proc.stderr
        table = run(["crontab", "-l"], user=user).stdout
        assert table.count("rejoin --log-file") == 1 and "*/5 * * * *" in table
        assert as_user(slurm_cluster, user_state, "cron", "show", "--crontab").returncode == 0
        assert as_user(slurm_cluster, user_state, "cron", "remove", "--crontab").returncode == 0
        assert "rejoin" not in run(["crontab", "-l"], user=user).stdout
        assert as_user(slurm_cluster, user_state, "cron", "show", "--crontab").returncode == 8
    finally:
        if before.strip():
            run(["crontab", "-"], user=user, input=before)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_time_limit_without_requeue_is_resubmitted_by_rejoin(slurm_cluster, user_state):
    """A site without requeue: the warning stops the role, the job then hits its time limit
    (TIMEOUT, not COMPLETED), and one rejoin brings the deployment back."""
    env = dict(
        user_state,
        HPCFED_SITE__PREEMPTION__REQUEUE="false",
        HPCFED_SITE__PREEMPTION__LEAD_TIME="30s",
    )
    name = f"rj-time-{uuid.uuid4().hex[:6]}"
    role = 'trap "echo role got TERM; exit 0" TERM; echo role-started; while :; do sleep 0.1; done'
    proc = as_user(
        slurm_cluster,
        env,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--time",
        "1m",
        "--command",
        role,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    try:
        deadline = time.monotonic() + 200
        while True:
            state = run(
                ["squeue", "--noheader", "-j", job_id, "--states=all", "--format=%T"]
            ).stdout.strip()
            if state in ("TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, state
            time.sleep(1)
        assert state == "TIMEOUT"
        log = as_user(slurm_cluster, env, "logs", name).stdout
        assert "received SIGUSR2" in log and "role got TERM" in log and "waiting for Slurm" in log
        assert "(time limit in about" in log  # told apart from a preemption
        proc = as_user(slurm_cluster, env, "rejoin", "--json")
        out = json.loads(proc.stdout)["deployments"][0]
        assert out["action"] == "resubmitted" and "TIMEOUT" in out["detail"], out
        assert len(our_active_jobs(name)) == 1
    finally:
        as_user(slurm_cluster, env, "cancel", name)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_no_record_but_the_role_exited_by_itself_is_not_resubmitted(slurm_cluster, user_state):
    """Without accounting a finished job vanishes from squeue after MinJobAge: rejoin then reads
    the job's own exit report instead of resubmitting a role that ended normally."""
    name = f"rj-done-{uuid.uuid4().hex[:6]}"
    proc = as_user(
        slurm_cluster,
        user_state,
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        "echo done",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    report = Path(f"/home/{slurm_cluster.user}/hpcfed/{name}/status-{job_id}.json")
    deadline = time.monotonic() + 60
    while not report.exists():
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # the scheduler "forgets" the job: point the record at a job id it never had
    record = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
    data = json.loads(record.read_text())
    data["jobs"][-1]["job_id"] = "999999"
    record.write_text(json.dumps(data))
    report.rename(report.with_name("status-999999.json"))
    out = json.loads(as_user(slurm_cluster, user_state, "rejoin", "--json").stdout)["deployments"][
        0
    ]
    assert out["action"] == "ended" and "exited by itself" in out["detail"], out
    assert our_active_jobs(name) == []
    # and without that report the same answer means lost: resubmitted
    report.with_name("status-999999.json").unlink()
    out = json.loads(as_user(slurm_cluster, user_state, "rejoin", "--json").stdout)["deployments"][
        0
    ]
    assert out["action"] == "resubmitted" and "GONE" in out["detail"], out
    as_user(slurm_cluster, user_state, "cancel", name)


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_a_job_of_another_user_with_our_marker_is_never_adopted(slurm_cluster, user_state):
    """Job names and comments are free text: another user (here root) can submit a job carrying
    exactly our deployment's name and marker. rejoin must look only at the user's own jobs."""
    name, job_id = submit_sleeper(slurm_cluster, user_state)
    record = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f"{name}.json"
    plan = json.loads(record.read_text())["plan"]
    admin_cancel(job_id)
    foreign = run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={plan['job_name']}",
            f"--comment={plan['comment']}",
            "--partition=debug",
            "--output=/dev/null",
            "--wrap=sleep 300",
        ]
    )
    assert foreign.returncode == 0, foreign.stderr
    foreign_id = foreign.stdout.strip().split(";")[0]
    try:
        assert int(foreign_id) > int(job_id)
        proc = as_user(slurm_cluster, user_state, "rejoin", "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)["deployments"][0]
        assert out["action"] == "resubmitted", out
        assert out["new_job_id"] != foreign_id
        owner = run(["squeue", "--noheader", "-j", out["new_job_id"], "--format=%u"]).stdout
        assert owner.strip() == slurm_cluster.user
        jobs = [j["job_id"] for j in json.loads(record.read_text())["jobs"]]
        assert foreign_id not in jobs and jobs[-1] == out["new_job_id"]
    finally:
        run(["scancel", foreign_id])
        as_user(slurm_cluster, user_state, "cancel", name)


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_cancel_during_a_long_rejoin_waits_or_fails_and_is_never_lost(slurm_cluster, user_state):
    """A rejoin holds the deployment's lock longer than any waiter's patience (its sbatch is
    slow, as over a sluggish SSH link): a `cancel` meanwhile must not break the live lock. It
    waits and fails clearly; it never says "cancelled" while rejoin goes on to start a job."""
    with sbatch_wrapper('sleep 130\nexec "$REAL" "$@"') as slow_path:
        _cancel_during_a_long_rejoin(slurm_cluster, user_state, slow_path)


def _cancel_during_a_long_rejoin(slurm_cluster, user_state, slow_path):
    env = dict(user_state, HPCFED_SITE__SCHEDULER__TIMEOUT="300")  # the sbatch is slow on purpose
    name, job_id = submit_sleeper(slurm_cluster, env)
    admin_cancel(job_id)
    rejoin_env = dict(os.environ, **user_state)
    import pwd

    pw = pwd.getpwnam(slurm_cluster.user)
    rejoin_env.update(HOME=pw.pw_dir, USER=pw.pw_name, PATH=slow_path)
    rejoin = subprocess.Popen(
        ["runuser", "-u", slurm_cluster.user, "--"] + HPCFED + ["rejoin", "--json"],
        env=rejoin_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = Path(user_state["XDG_STATE_HOME"]) / "hpcfed" / "deployments" / f".{name}.lock"
    try:
        deadline = time.monotonic() + 30
        while not lock.exists():
            assert time.monotonic() < deadline and rejoin.poll() is None, rejoin.stderr.read()
            time.sleep(0.1)
        # Cancel once rejoin has held the lock for over a minute: longer than cancel waits.
        time.sleep(70)
        cancel = as_user(slurm_cluster, user_state, "cancel", name, timeout=300)
        out, err = rejoin.communicate(timeout=200)
        assert rejoin.returncode == 0, err
        if cancel.returncode == 0:  # it waited for the rejoin: the new job must be gone
            assert our_active_jobs(name) == [], "cancelled, but the rejoined job runs"
        else:
            assert cancel.returncode == 7, cancel.stderr
            assert "held by another hpcfed" in cancel.stderr and "cancelled" not in cancel.stdout
            assert json.loads(out)["deployments"][0]["action"] == "resubmitted", out
            assert len(our_active_jobs(name)) == 1
            # once rejoin is done, cancel works
            cancel = as_user(slurm_cluster, user_state, "cancel", name)
            assert cancel.returncode == 0, cancel.stderr
            assert our_active_jobs(name) == []
        status = as_user(slurm_cluster, user_state, "status", name, "--json")
        assert json.loads(status.stdout)["deployments"][0]["stopped"] is True
    finally:
        if rejoin.poll() is None:
            rejoin.kill()
        as_user(slurm_cluster, user_state, "cancel", name)
