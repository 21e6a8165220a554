"""The in-job supervisor: it starts the role, stops it gracefully on the warning signal (TERM,
then KILL after the grace time), and reports the role's exit - as a process here and inside a
real Slurm job signalled through the scheduler."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

import pytest
from helpers import HPCFED, hpcfed, run

ROLE_GRACEFUL = (
    "trap 'echo \"role got TERM\"; exit 0' TERM; echo role-started; while :; do sleep 0.1; done"
)
ROLE_STUBBORN = (
    "trap 'echo \"role ignores TERM\"' TERM; echo role-started; while :; do sleep 0.1; done"
)


def make_plan(tmp_path, command, grace="2s", requeue=True):
    from hpcfed.frameworks import role
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site

    site = load_site(
        "local",
        environ={
            "HPCFED_SITE__PREEMPTION__GRACE": grace,
            "HPCFED_SITE__PREEMPTION__REQUEUE": str(requeue).lower(),
        },
    )
    plan = build_plan(
        site=site,
        role=role("nvflare", "client"),
        name="sup",
        deployment_id="d1",
        user="u",
        gpus=0,
        command=command,
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def start(plan_path, env=None):
    return subprocess.Popen(
        HPCFED + ["job", "run", str(plan_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(__import__("os").environ, SLURM_JOB_ID="777", **(env or {})),
    )


def wait_started(proc):
    for line in proc.stdout:
        if line.strip() == "role-started":  # not the log line quoting the command
            return
    pytest.fail("role never started")


@pytest.mark.timeout(60)
def test_user_signal_stops_the_role_gracefully(tmp_path):
    """Warning signal, no requeue allowed: the role stops at once, the supervisor stays until
    Slurm ends the job (so the job's final state says PREEMPTED/TIMEOUT, not COMPLETED)."""
    plan = make_plan(tmp_path, ROLE_GRACEFUL, requeue=False)
    proc = start(plan)
    wait_started(proc)
    proc.send_signal(signal.SIGUSR2)
    out = ""
    for line in proc.stdout:
        out += line
        if "waiting for Slurm to end the job" in line:
            break
    assert proc.poll() is None  # still there, holding the job
    proc.send_signal(signal.SIGTERM)  # Slurm ending the job
    out += proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert "received SIGUSR2: preemption or time limit ahead" in out
    assert "sending SIGTERM to the role" in out and "role got TERM" in out
    report = json.loads((tmp_path / "status-777.json").read_text())
    assert report["exit_code"] == 0 and report["reason"].startswith("SIGUSR2")
    events = [json.loads(l)["event"] for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == ["started", "role-stopped", "not-requeued"]


@pytest.mark.timeout(60)
def test_a_role_ignoring_term_is_killed_after_the_grace_time(tmp_path):
    plan = make_plan(tmp_path, ROLE_STUBBORN, grace="2s")
    proc = start(plan)
    wait_started(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    code = proc.wait(timeout=30)
    assert "role ignores TERM" in out and "SIGKILL" in out
    assert code == 137  # 128 + KILL
    assert 1.5 < time.monotonic() - t0 < 15


@pytest.mark.timeout(30)
def test_role_exit_code_becomes_the_job_exit_code(tmp_path):
    plan = make_plan(tmp_path, "echo role-started; exit 3")
    proc = start(plan)
    out = proc.stdout.read()
    assert proc.wait(timeout=20) == 3
    assert "role ended: exit code 3 (role exited)" in out


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_warning_signal_through_slurm_reaches_the_supervisor(slurm_cluster):
    name = f"sig-{uuid.uuid4().hex[:6]}"
    proc = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "0",
        "--name",
        name,
        "--command",
        ROLE_GRACEFUL,
        "--json",
        user=slurm_cluster.user,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    log = ""
    deadline = time.monotonic() + 60
    while "\nrole-started" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
        log = hpcfed("logs", name, user=slurm_cluster.user).stdout
    # what Slurm does ahead of preemption/time limit with --signal=B:USR2@lead
    assert run(["scancel", "--batch", "--signal=USR2", job_id]).returncode == 0
    deadline = time.monotonic() + 60
    while "role ended" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
        log = hpcfed("logs", name, user=slurm_cluster.user).stdout
    assert "received SIGUSR2" in log and "role got TERM" in log
    hpcfed("cancel", name, user=slurm_cluster.user)


def test_a_plan_it_cannot_read_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"name": 1}')
    proc = hpcfed("job", "run", str(bad))
    assert proc.returncode == 3
    assert (
        proc.stderr.strip()
        == f"hpcfed: error: {bad}: not a plan this hpcfed can run (name: Input should be a valid string)"
    )


@pytest.mark.timeout(60)
def test_tunnel_failure_is_reported_with_the_tunnels_own_reason(tmp_path):
    """The supervisor starts the tunnel through hpcfed.tunnel.job (the one implementation): a
    hub that never answers ends the job with exit 9 and the tunnel's own one-line reason
    ("no UDP egress to the hub ...") in the job's report, not "exited with code 9"."""
    import os

    from hpcfed.tunnel import keys

    conf = tmp_path / "wg.conf"
    conf.write_text(
        "[Interface]\n"
        f"PrivateKey = {keys.generate_private()}\n"
        "Address = 10.221.0.9/32\n"
        "[Peer]\n"
        f"PublicKey = {keys.public_from_private(keys.generate_private())}\n"
        "Endpoint = 127.0.0.1:9\n"
        "AllowedIPs = 10.220.0.0/14\n"
    )
    os.chmod(conf, 0o600)
    plan_path = make_plan(tmp_path, ROLE_GRACEFUL)
    plan = json.loads(plan_path.read_text())
    plan["tunnel"] = {
        "config": str(conf),
        "local_forwards": ["127.0.0.1:39998=10.220.0.2:8002"],
        "ready_timeout": 4,
    }
    plan_path.write_text(json.dumps(plan))
    proc = start(plan_path)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 9, out
    report = json.loads((tmp_path / "status-777.json").read_text())
    assert report["reason"].startswith("no UDP egress to the hub 127.0.0.1:9"), report
    assert "role-started" not in out


# ---------------------------------------------------------------- the parts, without Slurm
# The supervisor's parts take their clock, sleep, environment and scontrol as arguments: these
# tests drive them directly, with no real signal, no real waiting and no scheduler.


class FakeClock:
    """A clock that moves only when something sleeps."""

    def __init__(self, now=1000.0):
        self.now = now
        self.slept = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.slept += seconds


def handler(clock, time_limit=3600, lead_time=300):
    from hpcfed.supervisor.signals import SignalHandler

    return SignalHandler("USR2", time_limit, lead_time, clock=clock, sleep=clock.sleep)


def test_the_warning_signal_early_in_the_job_means_preemption():
    from hpcfed.supervisor.signals import PREEMPTION

    clock = FakeClock()
    h = handler(clock)
    clock.now += 600
    h.handle(signal.SIGUSR2)
    assert h.stop.kind == PREEMPTION and h.stop.warned and not h.terminating
    assert h.stop.reason == "SIGUSR2: preemption or time limit ahead (preemption)"
    assert h.stop.at == clock.now


def test_the_warning_signal_near_the_time_limit_means_the_time_limit():
    from hpcfed.supervisor.signals import TIME_LIMIT

    clock = FakeClock()
    h = handler(clock, time_limit=3600, lead_time=300)
    clock.now += 3600 - 310  # within lead time + slurmctld's lag
    h.handle(signal.SIGUSR2)
    assert h.stop.kind == TIME_LIMIT and h.stop.warned
    assert h.stop.reason == "SIGUSR2: preemption or time limit ahead (time limit in about 310s)"


def test_sigterm_is_a_cancel_and_a_later_signal_keeps_the_first_reason():
    from hpcfed.supervisor.signals import CANCEL

    clock = FakeClock()
    h = handler(clock)
    h.handle(signal.SIGTERM)
    first = h.stop
    assert first.kind == CANCEL and not first.warned and h.terminating
    assert first.reason == "SIGTERM: job is being stopped"
    h.handle(signal.SIGUSR2)
    h.stop_for("tunnel lost", "tunnel-lost")
    assert h.stop is first


def test_term_after_the_warning_ends_the_wait_for_slurm_but_keeps_the_warning():
    clock = FakeClock()
    h = handler(clock)
    h.handle(signal.SIGUSR2)
    h.handle(signal.SIGTERM)
    assert h.terminating and h.stop.warned
    h.wait_for_the_end(400)
    assert clock.slept == 0  # Slurm's TERM already came: no waiting at all


def test_the_wait_for_slurm_is_bounded():
    clock = FakeClock()
    h = handler(clock)
    h.handle(signal.SIGUSR2)
    h.wait_for_the_end(420)
    assert 419.5 < clock.slept < 420.5


def test_a_pause_is_cut_short_by_a_signal():
    clock = FakeClock()
    h = handler(clock)
    assert h.pause(10) and 9.5 < clock.slept < 10.5
    real_sleep = clock.sleep

    def sleep_then_signal(seconds):
        real_sleep(seconds)
        if clock.slept > 12:
            h.handle(signal.SIGTERM)

    h.sleep = sleep_then_signal
    assert not h.pause(10) and clock.slept < 13


def test_install_catches_term_int_and_the_sites_warning_signal():
    installed = {}
    h = handler(FakeClock())
    h.install(install=lambda signum, fn: installed.__setitem__(signum, fn))
    assert set(installed) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2}
    assert all(fn == h.handle for fn in installed.values())


def test_exit_codes_are_one_table_all_below_256_each_documented():
    from hpcfed import errors
    from hpcfed.errors import ExitCode, HpcfedError

    values = [int(c) for c in ExitCode]
    assert len(values) == len(set(values)) and all(0 <= v <= 255 for v in values)
    assert all(c.__doc__ and c.__doc__ != ExitCode.__doc__ for c in ExitCode)
    assert str(ExitCode.CONFIG) == "3" and f"{ExitCode.TUNNEL}" == "9"
    assert ExitCode.from_label("role-refused") is ExitCode.ROLE_REFUSED
    # every error class's code is in the table
    classes = [v for v in vars(errors).values() if isinstance(v, type)]
    for cls in classes:
        if issubclass(cls, HpcfedError):
            assert cls.exit_code in values, cls
    # the codes scripts and the README rely on never move
    assert [ExitCode.OK, ExitCode.USAGE, ExitCode.CONFIG, ExitCode.SCHEDULER_UNREACHABLE] == [
        0,
        2,
        3,
        4,
    ]
    assert (ExitCode.TUNNEL, ExitCode.PREFLIGHT, ExitCode.INTERNAL) == (9, 10, 70)


def test_no_module_but_errors_py_spells_an_exit_code():
    """Exit codes come from hpcfed.errors.ExitCode; a literal elsewhere is a second table."""
    import re
    from pathlib import Path

    import hpcfed

    literal = re.compile(
        r"(sys\.exit|SystemExit|\.exit|report|end)\(\s*\d+\s*[,)]"
        r"|\bexit_code\s*=\s*\d"
        r"|^\s*EXIT_[A-Z_]+\s*=\s*\d",
        re.M,
    )
    root = Path(hpcfed.__file__).parent
    found = [
        f"{p.relative_to(root)}: {m.group(0).strip()}"
        for p in root.rglob("*.py")
        if p.name != "errors.py"
        for m in literal.finditer(p.read_text())
    ]
    assert found == []


def test_every_framework_failure_maps_to_a_table_code():
    from hpcfed import frameworks
    from hpcfed.errors import ExitCode

    failures = [
        f for roles in frameworks.table().values() for r in roles.values() for f in r.failures
    ]
    assert failures
    for f in failures:
        assert f.exit in ExitCode and 0 < f.exit <= 255
    refused = frameworks.role("flower", "supernode").failures[0]
    assert (refused.code, refused.exit) == (305, ExitCode.ROLE_REFUSED)


def test_an_unknown_exit_label_in_the_role_table_is_a_config_error():
    from hpcfed.errors import ConfigError
    from hpcfed.frameworks import _failure

    with pytest.raises(ConfigError, match="exit 'kaputt': one of ok, failed"):
        _failure(
            "flower", "supernode", {"match": "x", "code": 305, "message": "m", "exit": "kaputt"}
        )


def test_a_framework_code_above_255_becomes_a_table_code_and_is_named():
    from hpcfed.errors import ExitCode
    from hpcfed.frameworks import Failure
    from hpcfed.supervisor.role_process import failure_exit

    code, reason = failure_exit(
        Failure("Exit Code: 305", 305, "key not registered", ExitCode.ROLE_REFUSED), "flower"
    )
    assert code == ExitCode.ROLE_REFUSED and code <= 255 and code != 305 % 256
    assert reason == "role-refused: key not registered; flower exit code 305"


def test_the_role_process_recognises_a_known_failure_in_its_output(capsys):
    import io
    from pathlib import Path

    from hpcfed.frameworks import Failure
    from hpcfed.supervisor.role_process import RoleProcess

    out = io.BytesIO()
    failure = Failure("Exit Code: 305", 305, "refused")
    role = RoleProcess.start(
        ["sh", "-c", "echo starting; echo 'ERROR : Exit Code: 305'; exit 1"],
        env={"PATH": "/usr/bin:/bin"},
        cwd=Path("/"),
        framework="flower",
        role="supernode",
        failures=(failure,),
        out=out,
    )
    assert role.exit_code() == 1 and role.failure == failure
    assert out.getvalue() == b"starting\nERROR : Exit Code: 305\n"  # the role's output, unchanged
    assert "flower supernode: refused (flower exit code 305)" in capsys.readouterr().err


def test_a_role_killed_by_a_signal_exits_the_shells_way():
    from pathlib import Path

    from hpcfed.supervisor.role_process import RoleProcess

    role = RoleProcess.start(["sh", "-c", "kill -9 $$"], {}, Path("/"), "nvflare", "client")
    assert role.exit_code() == 137 and role.failure is None


def test_retry_only_within_the_failures_own_time():
    from hpcfed.frameworks import Failure
    from hpcfed.supervisor.role_process import RETRY_PAUSE, retryable

    f = Failure("x", 305, "m", retry_for=100)
    assert retryable(f, 0) and retryable(f, 100 - RETRY_PAUSE)
    assert not retryable(f, 100 - RETRY_PAUSE + 1)
    assert not retryable(Failure("x", 305, "m"), 0) and not retryable(None, 0)


def flower_supernode_plan(tmp_path):
    from hpcfed import frameworks
    from hpcfed.plan import build_plan
    from hpcfed.profiles import load_site

    return build_plan(
        site=load_site("local"),
        role=frameworks.role("flower", "supernode"),
        name="refused",
        deployment_id="d",
        user="u",
        gpus=0,
        kit=str(tmp_path),
        server_address=("fl-server", 9093),
    )


def test_a_supernode_refused_for_good_ends_the_job_with_a_table_code_naming_305(
    tmp_path, capsys, monkeypatch
):
    """Flower's 305 (key not registered) is retried for its 100 s - on a fake clock here - and
    then ends the job with ROLE_REFUSED (12), not 305 (Slurm would show 49); the log line, the
    exit report and the event name Flower's own 305."""
    import os

    from hpcfed.errors import ExitCode
    from hpcfed.supervisor.run import Supervisor

    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "flower-supernode"
    fake.write_text("#!/bin/sh\necho 'ERROR : Exit Code: 305'; exit 1\n")
    fake.chmod(0o755)
    clock = FakeClock()
    environ = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="55")

    def sleep(seconds):
        # Fake time passes only in the pauses between starts; while the stand-in runs, real
        # time does (how long a fork takes must not decide how many retries there are).
        if sup.role is not None and sup.role.poll() is None:
            time.sleep(0.01)
        else:
            clock.sleep(seconds)

    sup = Supervisor(flower_supernode_plan(tmp_path), tmp_path, environ, clock=clock, sleep=sleep)
    code = sup.supervise()
    err = capsys.readouterr().err
    assert code == ExitCode.ROLE_REFUSED == 12
    # retried at 0, 10, ..., 80 (90: each pause may overshoot by one 0.2 s step), while its
    # 100 s allow one more 10 s pause
    assert err.count("retrying in 10s") in (9, 10), err
    assert 90 <= sup.signals.elapsed() <= 102
    assert err.rstrip().endswith(
        "role ended: exit code 12 (role-refused: the SuperLink refused to activate this "
        "SuperNode: its public key is not registered (the operator runs `hpcfed kit flower "
        "register`); flower exit code 305)"
    )
    report = json.loads((tmp_path / "status-55.json").read_text())
    assert (report["exit_code"], report["framework_exit_code"]) == (12, 305)
    event = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "role-failed" and "flower exit code 305" in event["detail"]
    assert event["detail"].endswith("(exit code 12)")


def test_a_role_that_cannot_start_is_reported_as_role_failed(tmp_path, capsys):
    from hpcfed.errors import ExitCode
    from hpcfed.supervisor.run import Supervisor

    plan = json.loads(make_plan(tmp_path, "true").read_text())
    from hpcfed.plan import Plan

    sup = Supervisor(
        Plan.model_validate(plan), tmp_path, {"SLURM_JOB_ID": "56", "PATH": "/nonexistent"}
    )
    assert sup.supervise() == ExitCode.ROLE_FAILED
    report = json.loads((tmp_path / "status-56.json").read_text())
    assert report["reason"].startswith("cannot start nvflare client: ")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("outcome", "events"),
    [
        (("requeued", "scontrol requeue"), ["role-stopped", "requeued"]),
        (
            ("refused", "Requested operation is presently disabled"),
            ["role-stopped", "requeue-failed"],
        ),
    ],
)
def test_preemption_stops_the_role_and_asks_slurm_to_requeue(
    tmp_path, monkeypatch, outcome, events
):
    """The warning signal, handled with no real signal: the role is stopped gracefully and
    `scontrol requeue` (a stand-in) is asked for this job; refused, the job waits for Slurm."""
    import os
    import threading

    from hpcfed.plan import Plan
    from hpcfed.supervisor import run as run_module

    asked = []
    monkeypatch.setattr(run_module, "requeue", lambda job_id: asked.append(job_id) or outcome)
    role = "trap 'exit 0' TERM; touch trap-set; while :; do sleep 0.1; done"
    plan = Plan.model_validate(json.loads(make_plan(tmp_path, role).read_text()))
    sup = run_module.Supervisor(plan, tmp_path, dict(os.environ, SLURM_JOB_ID="57"))
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=sup.supervise()))
    worker.start()
    deadline = time.monotonic() + 20
    while not (tmp_path / "trap-set").exists():  # the role is there and handles TERM
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.05)
    sup.signals.handle(signal.SIGUSR2)
    if outcome[0] != "requeued":
        time.sleep(1)
        assert worker.is_alive()  # waiting for Slurm's TERM
        sup.signals.handle(signal.SIGTERM)
    worker.join(30)
    assert result == {"code": 0} and asked == ["57"]
    recorded = [
        json.loads(l)["event"] for l in (tmp_path / "events.jsonl").read_text().splitlines()
    ]
    assert recorded == events


def test_the_readme_documents_the_exit_code_table():
    """The README's table lists exactly the codes of hpcfed.errors.ExitCode, by name."""
    import re
    from pathlib import Path

    from hpcfed.errors import ExitCode

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", section, re.M)
    assert {(int(c), n) for c, n in rows} == {(int(c), c.name) for c in ExitCode}
