"""hpcfed.model: the records the profile schema and the plan are made of (pydantic's part we use).

What users rely on through it: a profile value of the wrong type or an unknown key is refused
with its key path; a plan read back from JSON equals the plan written; records cannot change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

import pytest

from hpcfed.model import Field, Model, ValidationError, field_validator, model_validator


class Inner(Model, strict=True):
    port: int = Field(default=22, ge=1, le=65535)
    host: Optional[str] = None


class Outer(Model, strict=True):
    inner: Inner = Inner()
    mode: Literal["a", "b"] = "a"
    tags: List[str] = []
    env: Dict[str, str] = {}

    @field_validator("tags")
    @classmethod
    def _no_commas(cls, v: List[str]) -> List[str]:
        if any("," in t for t in v):
            raise ValueError("no ',' in a tag")
        return v


class Stricter(Outer):
    @model_validator(mode="after")
    def _b_needs_tags(self) -> Stricter:
        if self.mode == "b" and not self.tags:
            raise ValueError("mode b needs tags")
        return self


@dataclass(frozen=True)
class Item:
    name: str
    size: int


class Stored(Model):  # lax: how a plan is read back from JSON
    items: Tuple[Item, ...] = ()
    pairs: Tuple[Tuple[str, str], ...] = ()
    count: int
    on: bool = False


def problems(cls, data):
    with pytest.raises(ValidationError) as info:
        cls.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["type"]) for e in info.value.errors()]


def test_every_problem_is_reported_with_its_key_path():
    bad = {"inner": {"port": "22", "colour": 1}, "mode": "c", "tags": ["x,y"], "extra": 0}
    assert sorted(problems(Outer, bad)) == [
        ("extra", "extra_forbidden"),
        ("inner.colour", "extra_forbidden"),
        ("inner.port", "int_type"),
        ("mode", "literal_error"),
        ("tags", "value_error"),
    ]
    assert problems(Outer, {"inner": {"port": 0}}) == [("inner.port", "greater_than_equal")]
    assert problems(Stored, {}) == [("count", "missing")]
    assert problems(Stored, {"count": 1, "items": [{"name": "a"}]}) == [("items.0.size", "missing")]


def test_strict_takes_values_only_as_written_lax_reads_json_back():
    assert problems(Outer, {"inner": {"port": True}}) == [("inner.port", "int_type")]
    assert problems(Outer, {"tags": ("a",)}) == [("tags", "list_type")]
    s = Stored.model_validate({"count": "3", "on": "true", "items": [{"name": "a", "size": 1}]})
    assert (s.count, s.on, s.items) == (3, True, (Item("a", 1),))


def test_model_validators_run_after_the_fields_and_are_inherited():
    assert problems(Stricter, {"mode": "b"}) == [((""), "value_error")]
    assert problems(Stricter, {"tags": ["a,b"]}) == [("tags", "value_error")]  # base's check
    assert Stricter.model_validate({"mode": "b", "tags": ["t"]}).tags == ["t"]


def test_json_round_trip_equality_and_frozen_records():
    s = Stored(count=2, items=(Item("a", 1),), pairs=(("h", "127.0.0.1"),))
    text = s.model_dump_json(indent=2)
    assert Stored.model_validate_json(text) == s
    assert hash(Stored.model_validate_json(text)) == hash(s)
    assert s.model_dump(mode="json")["pairs"] == [["h", "127.0.0.1"]]
    with pytest.raises(AttributeError):
        s.count = 3  # type: ignore[misc]
    assert s.model_copy(update={"count": 5}).count == 5 and s.count == 2


def test_defaults_are_not_shared_between_records():
    a, b = Outer(), Outer()
    a.tags.append("x")
    assert b.tags == [] and Outer().tags == []


def test_bad_json_is_a_validation_error():
    with pytest.raises(ValidationError, match="Invalid JSON"):
        Stored.model_validate_json("{not json")
    with pytest.raises(ValidationError):
        Stored.model_validate([1, 2])
