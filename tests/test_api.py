"""The Python API (hpcfed.Site, hpcfed.Deployment, hpcfed.deployments) against the real local
Slurm cluster: submit -> status -> logs -> cancel -> wait, the same deployments the CLI sees, and
the same exception types and one-line messages as the CLI for bad input."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from helpers import hpcfed, run

import hpcfed as api  # the package under test, imported as a library
from hpcfed.errors import ConfigError, HpcfedError, NotFound, SubmitRejected

pytestmark = pytest.mark.slurm


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def own_dirs(tmp_path, monkeypatch, slurm_cluster):
    """This test's own state, config, data and job directories (the API reads the environment,
    like the CLI); the same variables for CLI processes the test starts."""
    env = {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "HPCFED_SITE__WORKDIR": str(tmp_path / "jobs"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def squeue_state(job_id: str) -> str:
    return run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"]).stdout.strip()


def wait_for(predicate, what: str, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout}s (last {last!r})")


@pytest.mark.timeout(240)
def test_submit_status_logs_cancel_wait(own_dirs):
    name = unique("api")
    site = api.Site("local")
    dep = site.submit(
        "client", gpus=2, name=name, command='echo "API GPUS=$CUDA_VISIBLE_DEVICES"; sleep 300'
    )
    assert dep.submitted and dep.name == name and dep.job_id and dep.job_id.isdigit()
    assert dep.plan.resources.gpus == 2 and dep.script.startswith("#!/bin/bash")

    # The CLI sees what the API submitted (one store, one format).
    cli = hpcfed("status", name, "--json", env=own_dirs)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["deployments"][0]["job_id"] == dep.job_id

    wait_for(lambda: dep.state == "RUNNING", f"{name} RUNNING")
    st = dep.status()
    assert st.job_id == dep.job_id and st.node.startswith("node") and st.active

    def log_so_far() -> str:
        try:
            return dep.logs()
        except NotFound:  # RUNNING before the job's first line reached the file
            return ""

    log = wait_for(lambda: "API GPUS=" in log_so_far() and log_so_far(), "log line")
    line = [l for l in log.splitlines() if l.startswith("API GPUS=")][0]
    assert len(line.split("=")[1].split(",")) == 2, line  # the two GPUs Slurm assigned

    dep.cancel()
    final = dep.wait(timeout=90, interval=0.5)
    assert final.state == "STOPPED" and final.stopped and not final.active
    assert final.job_state in ("CANCELLED", "COMPLETED", "FAILED"), final
    assert squeue_state(dep.job_id) in ("", "CANCELLED", "COMPLETING", "COMPLETED")
    # the CLI agrees it was stopped on purpose
    cli = json.loads(hpcfed("status", name, "--json", env=own_dirs).stdout)["deployments"][0]
    assert cli["state"] == "STOPPED" and cli["stopped"] is True


@pytest.mark.timeout(240)
def test_wait_returns_when_the_job_ends_and_follow_streams_its_log(own_dirs):
    name = unique("api-done")
    dep = api.Site("local").submit("client", gpus=0, name=name, command="sleep 2; echo api-done")
    text = "".join(dep.logs(follow=True, interval=0.5))  # returns when the job has ended
    assert "api-done" in text
    final = dep.wait(timeout=60, interval=0.5)
    assert final.job_state == "COMPLETED" and final.state == "COMPLETED", final
    # picked up again by name, as a notebook restarted later would
    again = api.deployment(name)
    assert again.job_id == dep.job_id and again.status().state == "COMPLETED"
    assert [d.name for d in api.deployments()] == [name]


@pytest.mark.timeout(120)
def test_a_deployment_submitted_by_the_cli_is_driven_from_python(own_dirs):
    name = unique("cli-made")
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
        "sleep 300",
        "--json",
        env=own_dirs,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    dep = api.deployment(name)
    assert dep.job_id == job_id and dep.role == "client" and dep.site == "local"
    dep.cancel()
    assert dep.wait(timeout=60, interval=0.5).state == "STOPPED"


@pytest.mark.timeout(120)
def test_dry_run_is_the_cli_dry_run_and_records_nothing(own_dirs):
    name = unique("api-dry")
    dep = api.Site("local").submit("client", gpus=1, name=name, command="true", dry_run=True)
    assert not dep.submitted and dep.job_id is None and dep.state == "NOT_SUBMITTED"
    cli = hpcfed(
        "submit",
        "client",
        "--site",
        "local",
        "--gpus",
        "1",
        "--name",
        name,
        "--command",
        "true",
        "--dry-run",
        env=own_dirs,
    )
    assert cli.returncode == 0, cli.stderr
    assert dep.script == cli.stdout
    assert api.deployments() == []
    with pytest.raises(NotFound):
        api.deployment(name)
    with pytest.raises(NotFound):
        dep.cancel()


# (keyword arguments for the API, the same request as CLI flags, the exception type expected)
BAD_REQUESTS = [
    (dict(site="nosuchsite"), ["--site", "nosuchsite"], NotFound),
    (dict(gpus=99), ["--gpus", "99"], ConfigError),
    (dict(time="3d"), ["--time", "3d"], ConfigError),
    (dict(role="juggler"), [], ConfigError),
    (dict(name="bad name!"), ["--name", "bad name!"], ConfigError),
    (dict(kit="/nonexistent/kit", command=None), ["--kit", "/nonexistent/kit"], NotFound),
    (dict(partition="nosuchpart"), ["--partition", "nosuchpart"], SubmitRejected),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kwargs,flags,exc_type", BAD_REQUESTS)
def test_bad_input_raises_the_cli_error_type_and_message(own_dirs, kwargs, flags, exc_type):
    kwargs = dict(kwargs)
    site = kwargs.pop("site", "local")
    role = kwargs.pop("role", "client")
    kwargs.setdefault("command", "true")
    kwargs.setdefault("name", unique("api-bad"))
    with pytest.raises(HpcfedError) as caught:
        api.Site(site).submit(role, **kwargs)
    exc = caught.value
    assert type(exc) is exc_type, exc
    message = str(exc)
    assert "\n" not in message

    argv = ["submit", role, "--site", site, *flags]
    if "--name" not in flags:
        argv += ["--name", kwargs["name"]]
    if kwargs["command"] is not None:
        argv += ["--command", kwargs["command"]]
    cli = hpcfed(*argv, env=own_dirs)
    assert cli.returncode == exc.exit_code, cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == f"hpcfed: error: {message}"
    assert api.deployments() == []  # nothing recorded, nothing submitted
    if exc_type is not SubmitRejected:  # refused by sbatch: its log directory exists by then
        assert not os.path.exists(os.path.join(own_dirs["HPCFED_SITE__WORKDIR"], kwargs["name"]))
