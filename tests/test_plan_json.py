"""The stored plan JSON is a contract: queued jobs carry it in their script and `hpcfed rejoin`
compares a recorded plan against a fresh one. These golden files were written by the code before
the plan's sections were derived from the profile schema; a plan built from the same inputs must
still serialise to exactly these bytes, and the recorded files must still load.

Regenerate only after an intended format change, with UPDATE_GOLDEN=1, and read the diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcfed.frameworks import role
from hpcfed.plan import Plan, build_plan
from hpcfed.profiles import load_site

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))


# name -> (site, framework, role, environment overrides, build_plan keywords)
CASES = {
    "plan-nvflare-client-defaults": (
        "local",
        "nvflare",
        "client",
        {},
        dict(gpus=2, kit="/home/alice/kits/site-1"),
    ),
    "plan-nvflare-server-tuned": (
        "generic",
        "nvflare",
        "server",
        {
            "HPCFED_SITE__REJOIN__BACKOFF": "1m",
            "HPCFED_SITE__REJOIN__MAX_BACKOFF": "2h",
            "HPCFED_SITE__REJOIN__MAX_RESUBMITS": "9",
            "HPCFED_SITE__REJOIN__WINDOW": "1d",
            "HPCFED_SITE__PREEMPTION__SIGNAL": "SIGTERM",
            "HPCFED_SITE__PREEMPTION__LEAD_TIME": "3m",
            "HPCFED_SITE__PREEMPTION__GRACE": "45",
            "HPCFED_SITE__PREEMPTION__REQUEUE": "false",
            "HPCFED_SITE__PREFLIGHT__ALLOW_WITHOUT_NVML": "true",
            "HPCFED_SITE__PREFLIGHT__MIN_MEMORY_MIB": "4096",
        },
        dict(
            kit="kits/server1",
            time="2h",
            tunnel_config="tunnel/server.conf",
            remote_forwards=("8002=localhost:18002", "8003=localhost:8003"),
            server_address=("server1", 8002),
        ),
    ),
    "plan-nvflare-client-tunnel": (
        "generic",
        "nvflare",
        "client",
        {},
        dict(
            gpus=1,
            kit="kits/site-2",
            image="/images/nvflare.sif",
            tunnel_config="tunnel/site-2.conf",
            local_forwards=("8002=10.99.0.1:8002",),
            server_address=("server1", 8002),
            partition="gpu",
        ),
    ),
    "plan-flower-supernode": (
        "local",
        "flower",
        "supernode",
        {},
        dict(
            gpus=1,
            kit="/home/alice/kits/flower-site-1",
            tunnel_config="tunnel/site-1.conf",
            local_forwards=("9093=10.99.0.1:9093",),
            server_address=("superlink", 9093),
        ),
    ),
}


def make(case: str) -> Plan:
    site_name, framework, role_name, environ, kwargs = CASES[case]
    return build_plan(
        site=load_site(site_name, environ=environ),
        role=role(framework, role_name),
        name=f"golden-{role_name}",
        deployment_id="0123456789ab",
        user="alice",
        **kwargs,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_json_is_byte_identical_to_the_recorded_one(case):
    text = make(case).to_json()
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text + "\n" == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_recorded_plan_still_loads_and_equals_a_fresh_one(case):
    recorded = Plan.from_json((GOLDEN / f"{case}.json").read_text())
    assert recorded == make(case)
    assert recorded.to_json() + "\n" == (GOLDEN / f"{case}.json").read_text()
    # `hpcfed rejoin` reads the recorded plan from the deployment record as a dict
    assert Plan.model_validate(recorded.model_dump(mode="json")) == recorded


def test_a_plan_recorded_before_rejoin_existed_loads_with_the_schema_defaults():
    import json

    data = json.loads((GOLDEN / "plan-nvflare-client-defaults.json").read_text())
    del data["rejoin"]
    plan = Plan.model_validate(data)
    assert plan.rejoin.model_dump() == {
        "backoff": 30,
        "max_backoff": 1800,
        "max_resubmits": 5,
        "window": 21600,
    }
