"""Golden files: the exact sbatch script each bundled profile renders (review a diff, not a
guess). Regenerate after an intended change with UPDATE_GOLDEN=1 and read the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcfed.errors import ConfigError
from hpcfed.frameworks import role
from hpcfed.plan import Plan, build_plan
from hpcfed.profiles import load_site
from hpcfed.render import render

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    """Only the bundled profiles: a developer's own ~/.config/hpcfed/sites must not leak in."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))


# name -> (site, role, environment overrides, build_plan keywords)
CASES = {
    "local-client-typed-gres": ("local", "client", {}, dict(gpus=2, kit="/home/alice/kits/site-1")),
    "local-client-untyped-gres": (
        "local",
        "client",
        {"HPCFED_SITE__GPUS__DEFAULT_TYPE": "null"},
        dict(gpus=2, kit="/home/alice/kits/site-1"),
    ),
    "local-client-gpus-per-node": (
        "local",
        "client",
        {"HPCFED_SITE__GPUS__DIALECT": "gpus-per-node"},
        dict(gpus=1, command="nvidia-smi -L"),
    ),
    "local-server-no-gpu": (
        "local",
        "server",
        {},
        dict(kit="/home/alice/kits/server1", time="12h"),
    ),
    "ohsu-client-image": (
        "ohsu",
        "client",
        {},
        dict(
            gpus=2, gpu_type="a100", kit="kits/site-1", image="/home/exacloud/gscratch/nvflare.sif"
        ),
    ),
    "generic-client-tunnel": (
        "generic",
        "client",
        {},
        dict(
            gpus=1,
            kit="kits/site-2",
            tunnel_config="tunnel/site-2.conf",
            local_forwards=("8002=10.99.0.1:8002",),
            partition="gpu",
        ),
    ),
}


def make(case):
    site_name, role_name, environ, kwargs = CASES[case]
    site = load_site(site_name, environ=environ)
    return build_plan(
        site=site,
        role=role("nvflare", role_name),
        name=f"golden-{role_name}",
        deployment_id="0123456789ab",
        user="alice",
        **kwargs,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_matches_golden(case):
    script = render(make(case))
    path = GOLDEN / f"{case}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(script)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert script == path.read_text()


def test_dialects_render_the_right_gpu_line():
    assert "#SBATCH --gres=gpu:a40:2\n" in render(make("local-client-typed-gres"))
    assert "#SBATCH --gres=gpu:2\n" in render(make("local-client-untyped-gres"))
    assert "#SBATCH --gpus-per-node=a40:1\n" in render(make("local-client-gpus-per-node"))
    assert "#SBATCH --gpus=1\n" in render(make("generic-client-tunnel"))
    assert "--gres" not in render(make("local-server-no-gpu"))


def test_plan_is_json_round_trippable_and_immutable():
    plan = make("ohsu-client-image")
    again = Plan.from_json(plan.to_json())
    assert again == plan
    with pytest.raises(AttributeError):
        plan.name = "other"  # frozen
    # the script carries the plan the job will run
    script = render(plan)
    embedded = script.split("<<'HPCFED_PLAN'\n")[1].split("\nHPCFED_PLAN\n")[0]
    assert Plan.from_json(embedded) == plan
    assert json.loads(embedded)["resources"]["gpu_option"] == "--gres=gpu:a100:2"


def test_a_value_that_would_break_its_sbatch_line_is_refused():
    # Refused when the profile is read (the key is named) ...
    with pytest.raises(ConfigError, match="account: .*one word"):
        load_site("local", environ={"HPCFED_SITE__ACCOUNT": '"fedlab\\n#SBATCH --exclusive"'})
    # ... and render itself still refuses a multi-line value in a plan made some other way.
    plan = make("local-client-typed-gres")
    bad = plan.model_copy(
        update={
            "resources": plan.resources.model_copy(update={"account": "x\n#SBATCH --exclusive"})
        }
    )
    with pytest.raises(ConfigError, match="must be one line"):
        render(bad)


def test_render_is_strict_about_undefined_variables(tmp_path, monkeypatch):
    from hpcfed import paths
    from hpcfed import render as render_mod

    (tmp_path / "job.sbatch.j2").write_text("#!/bin/bash\n#SBATCH --foo={{ plan.no_such_field }}\n")
    monkeypatch.setattr(paths, "sbatch_templates_dir", lambda: tmp_path)
    render_mod._environment.cache_clear()
    try:
        with pytest.raises(Exception, match="no_such_field"):
            render(make("local-client-typed-gres"))
    finally:
        render_mod._environment.cache_clear()


def test_compiled_template_is_cached_privately_and_a_cache_never_fails_a_render(
    tmp_path, monkeypatch
):
    from hpcfed import render as render_module

    plan = make("local-server-no-gpu")
    expected = render(plan)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    render_module._environment.cache_clear()
    assert render(plan) == expected
    compiled = list((cache / "hpcfed" / "jinja2").iterdir())
    assert len(compiled) == 1 and compiled[0].name.endswith(".cache")
    assert (cache / "hpcfed" / "jinja2").stat().st_mode & 0o777 == 0o700
    render_module._environment.cache_clear()  # a new process: loads what the last one compiled
    assert render(plan) == expected
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # no directory can be made there
    render_module._environment.cache_clear()
    assert render(plan) == expected
    render_module._environment.cache_clear()
