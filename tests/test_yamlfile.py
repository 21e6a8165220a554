"""hpcfed.yamlfile: YAML parses remembered by content (what every submit reads: role table,
profiles, HPCFED_SITE__* values). A user relies on: an edited profile is read as edited, bad YAML
names its line, and a broken cache never breaks a command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcfed import yamlfile


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hpcfed" / "yaml"


def test_a_parse_is_kept_privately_and_an_edit_is_a_new_parse(cache):
    assert yamlfile.safe_load("account: a\ncpus: 2\n") == {"account": "a", "cpus": 2}
    assert len(list(cache.glob("*.json"))) == 1
    assert cache.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.iterdir())
    assert yamlfile.safe_load("account: a\ncpus: 2\n") == {"account": "a", "cpus": 2}
    assert yamlfile.safe_load("account: b\ncpus: 2\n") == {"account": "b", "cpus": 2}
    assert len(list(cache.glob("*.json"))) == 2
    assert yamlfile.safe_load("") is None and yamlfile.safe_load("") is None


def test_what_json_would_change_is_parsed_each_time(cache):
    text = "ports: {8002: fl}\nwhen: 2024-01-01\n"
    first = yamlfile.safe_load(text)
    assert 8002 in first["ports"] and str(first["when"]) == "2024-01-01"
    assert yamlfile.safe_load(text) == first
    assert not list(cache.glob("*.json"))


def test_bad_yaml_names_its_line(cache):
    with pytest.raises(yamlfile.YamlError) as info:
        yamlfile.safe_load("a: 1\nb: [x\nc: 2\n")
    assert info.value.line in (2, 3) and "YAML syntax error" in str(info.value)


def test_an_unusable_cache_only_costs_the_parse(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert yamlfile.safe_load("x: 1\n") == {"x": 1}


def test_a_cached_parse_needs_no_yaml_import(cache):
    yamlfile.safe_load("site: cached\n")
    code = (
        "import sys; from hpcfed import yamlfile; "
        "assert yamlfile.safe_load('site: cached\\n') == {'site': 'cached'}; "
        "print('yaml' in sys.modules)"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(cache.parent.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
