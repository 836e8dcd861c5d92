"""The evolution rules (``eventbroker.schema.compat``): each rule in both
directions on real schema files, the chain check and its messages, and a
soundness check of ``changes`` against the compiled validator: where it says
a change keeps documents valid, no sample document tells otherwise."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventbroker.errors import SchemaError
from eventbroker.schema.compat import MODES, Change, changes, check_chain
from eventbroker.schema.compile import compile_node
from eventbroker.schema.model import Node, Version, read_versions


def _versions(tmp_path: Path, *docs: dict[str, Any], folder: str = "play", numbers: list[int] | None = None,
              extra: dict[str, Any] | None = None) -> dict[int, Version]:
    d = tmp_path / "schemas" / folder
    d.mkdir(parents=True, exist_ok=True)
    for n, doc in zip(numbers or range(1, len(docs) + 1), docs, strict=True):
        (d / f"{n}.json").write_text(json.dumps(doc))
    for name, doc in (extra or {}).items():
        p = tmp_path / "schemas" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc))
    return read_versions(tmp_path / "schemas", folder)


def _obj(props: dict[str, Any] | None = None, required: tuple[str, ...] = (), closed: bool = True,
         **more: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", **more}
    if props is not None:
        doc["properties"] = props
    if required:
        doc["required"] = list(required)
    if closed:
        doc["additionalProperties"] = False
    return doc


def _diff(tmp_path: Path, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    v = _versions(tmp_path, old, new)
    return changes(v[1].root, v[2].root)


def _field_diff(tmp_path: Path, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """The changes of field ``x`` (optional in a closed object) from ``old`` to ``new``."""
    return _diff(tmp_path, _obj({"x": old}), _obj({"x": new}))


def _breaks(cs: list[Change]) -> tuple[bool, bool]:
    return any(c.breaks_backward for c in cs), any(c.breaks_forward for c in cs)


# -- types ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "back", "fwd"), [
    ({"type": "integer"}, {"type": "string"}, True, True),
    ({"type": "integer"}, {"type": "number"}, False, True),  # widens
    ({"type": "number"}, {"type": "integer"}, True, False),  # narrows
    ({"type": "string"}, {"type": ["string", "null"]}, False, True),
    ({"type": ["string", "null"]}, {"type": "string"}, True, False),
    ({"type": ["integer", "string"]}, {"type": ["number", "string"]}, False, True),
    ({}, {"type": "integer"}, True, False),  # any -> some
    ({"type": "integer"}, {}, False, True),  # some -> any
    ({"type": "integer"}, True, False, True),  # the schema `true` is any value too
    ({}, {"type": "object", "properties": {"a": {"type": "integer"}}}, True, False),
    ({"type": "object"}, {}, False, True),
])
def test_type_changes(tmp_path, old, new, back, fwd):
    cs = _field_diff(tmp_path, old, new)
    assert cs, "a type change is listed"
    assert _breaks(cs) == (back, fwd), cs
    assert all(c.path == "$.x" for c in cs)


def test_type_change_text_names_the_path_and_both_types(tmp_path):
    cs = _diff(tmp_path, _obj({"track": {"type": "integer"}}), _obj({"track": {"type": "string"}}))
    assert cs == [Change("$.track", "type of `$.track` changes from integer to string", True, True)]
    cs = _field_diff(tmp_path, {"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]})
    assert cs == [Change("$.x", "type of `$.x` changes from string to null or string", False, True)]


def test_the_same_type_spelled_differently_is_no_change(tmp_path):
    assert _field_diff(tmp_path, {"type": ["string", "null"]},
                       {"anyOf": [{"type": "string"}, {"type": "null"}]}) == []
    assert _field_diff(tmp_path, {"type": ["integer", "number"]}, {"type": "number"}) == []
    assert _field_diff(tmp_path, {}, True) == []


# -- enum -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "back", "fwd"), [
    ({"type": "string"}, {"type": "string", "enum": ["a", "b"]}, True, False),  # None -> set
    ({"type": "string", "enum": ["a", "b"]}, {"type": "string"}, False, True),  # set -> None
    ({"enum": ["a", "b"]}, {"enum": ["a"]}, True, False),  # a value removed
    ({"enum": ["a"]}, {"enum": ["a", "b"]}, False, True),  # a value added
    ({"enum": ["a", "b"]}, {"enum": ["a", "c"]}, True, True),
    ({"enum": [1]}, {"enum": ["1"]}, True, True),  # 1 and "1" are different values
    ({"enum": [1, 2]}, {"type": "integer", "maximum": 10}, False, True),  # every old value still valid
    ({"enum": [1, 20]}, {"type": "integer", "maximum": 10}, True, True),  # 20 is not
    ({"enum": ["ab", "ac"]}, {"type": "string", "pattern": "^a"}, False, True),
    ({"enum": ["ab", "b"]}, {"type": "string", "pattern": "^a"}, True, True),
    ({"type": "string", "pattern": "^a"}, {"enum": ["ab"]}, True, False),  # new values all valid before
    ({"type": "string", "maxLength": 1}, {"enum": ["ab"]}, True, True),
    ({"type": "null"}, {"enum": [None, "a"]}, False, True),  # null was the only value
    ({"type": "boolean"}, {"enum": [0, 1]}, True, True),  # 0 and 1 are not false and true
    ({"type": "string", "enum": ["a"]}, {"enum": ["a", None]}, False, True),
])
def test_enum_changes(tmp_path, old, new, back, fwd):
    cs = _field_diff(tmp_path, old, new)
    assert cs
    assert _breaks(cs) == (back, fwd), cs


def test_enum_texts_and_what_is_no_change(tmp_path):
    assert _field_diff(tmp_path, {"enum": ["a", "b"]}, {"enum": ["b", "a"]}) == []  # order is no change
    assert _field_diff(tmp_path, {"const": "a"}, {"enum": ["a"]}) == []
    assert _field_diff(tmp_path, {"type": "string", "enum": ["a"]}, {"enum": ["a"]}) == []
    assert _field_diff(tmp_path, {"enum": ["a", "b", 3]}, {"enum": ["a", "c", None]}) == [
        Change("$.x", 'enum of `$.x` drops "b", 3', True, False),
        Change("$.x", 'enum of `$.x` adds "c", null', False, True),
    ]
    [c] = _field_diff(tmp_path, {"type": "string"}, {"enum": ["a", "b"]})
    assert c.text == '`$.x` is restricted to enum "a", "b"'


# -- bounds ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "back", "fwd"), [
    ({"maximum": 10}, {"maximum": 5}, True, False),
    ({"maximum": 5}, {"maximum": 10}, False, True),
    ({}, {"maximum": 5}, True, False),
    ({"maximum": 5}, {}, False, True),
    ({"minimum": 0}, {"minimum": 1}, True, False),
    ({"minimum": 1}, {"minimum": 0}, False, True),
    ({}, {"minimum": 0}, True, False),
    ({"minimum": 0}, {}, False, True),
    ({"minimum": 0}, {"exclusiveMinimum": 0}, True, False),  # 0 no longer valid
    ({"exclusiveMinimum": 0}, {"minimum": 0}, False, True),
    ({"maximum": 10}, {"exclusiveMaximum": 10}, True, False),
    ({"exclusiveMaximum": 10}, {"maximum": 10}, False, True),
    ({"minimum": 0, "exclusiveMinimum": 5}, {"minimum": 5}, False, True),  # > 5 becomes >= 5
    ({"minimum": 5}, {"minimum": 0, "exclusiveMinimum": 5}, True, False),
    ({"minimum": 0, "exclusiveMinimum": -1}, {"minimum": 0}, False, False),  # the same effective bound
])
def test_number_bounds(tmp_path, old, new, back, fwd):
    cs = _field_diff(tmp_path, {"type": "number", **old}, {"type": "number", **new})
    assert _breaks(cs) == (back, fwd), cs
    assert bool(cs) == (back or fwd)


@pytest.mark.parametrize(("old", "new", "back", "fwd"), [
    ({"type": "integer", "minimum": 0.5}, {"type": "integer", "minimum": 1}, False, False),  # both: >= 1
    ({"type": "integer", "exclusiveMinimum": 0}, {"type": "integer", "minimum": 1}, False, False),
    ({"type": "integer", "exclusiveMaximum": 10}, {"type": "integer", "maximum": 9.5}, False, False),
    ({"type": "integer", "minimum": 0.5}, {"type": "integer", "minimum": 1.5}, True, False),
    ({"type": "number", "minimum": 0.5}, {"type": "number", "minimum": 1}, True, False),  # 0.7 was valid
    ({"type": "integer", "minimum": 1}, {"type": "number", "minimum": 0.5}, False, True),  # integers >= 1 fit
    ({"type": "number", "minimum": 0.5}, {"type": "integer", "minimum": 1}, True, False),
])
def test_integer_bounds_are_compared_over_integers(tmp_path, old, new, back, fwd):
    cs = _field_diff(tmp_path, old, new)
    assert cs  # listed even when it breaks nothing
    assert _breaks(cs) == (back, fwd), cs


def test_bound_texts(tmp_path):
    [c] = _field_diff(tmp_path, {"type": "integer", "maximum": 10}, {"type": "integer", "maximum": 5})
    assert c == Change("$.x", "maximum of `$.x` lowered from 10 to 5", True, False)
    [c] = _field_diff(tmp_path, {"type": "integer", "maximum": 5}, {"type": "integer", "maximum": 10})
    assert c == Change("$.x", "maximum of `$.x` raised from 5 to 10", False, True)
    [c] = _field_diff(tmp_path, {"type": "integer"}, {"type": "integer", "minimum": 0})
    assert c.text == "minimum of `$.x` set to 0"
    [c] = _field_diff(tmp_path, {"type": "number", "exclusiveMinimum": 0.5}, {"type": "number"})
    assert c.text == "minimum of `$.x` removed (was 0.5 (exclusive))"
    [c] = _field_diff(tmp_path, {"type": "integer", "minimum": 0.5}, {"type": "integer", "minimum": 1})
    assert c.text == "minimum of `$.x` changes from 0.5 to 1"
    [c] = _field_diff(tmp_path, {"type": "string", "minLength": 1}, {"type": "string", "minLength": 3})
    assert c == Change("$.x", "minLength of `$.x` raised from 1 to 3", True, False)


@pytest.mark.parametrize(("kind", "lo", "hi"), [("string", "minLength", "maxLength"),
                                                 ("array", "minItems", "maxItems")])
def test_length_and_size_bounds(tmp_path, kind, lo, hi):
    def check(old, new):
        return _breaks(_field_diff(tmp_path, {"type": kind, **old}, {"type": kind, **new}))
    assert check({lo: 1}, {lo: 2}) == (True, False)  # raised
    assert check({}, {lo: 1}) == (True, False)  # newly set
    assert check({lo: 2}, {lo: 1}) == (False, True)  # lowered
    assert check({lo: 1}, {}) == (False, True)  # removed
    assert check({lo: 0}, {}) == (False, True)  # removing even a vacuous bound is listed as looser
    assert check({hi: 5}, {hi: 3}) == (True, False)
    assert check({}, {hi: 3}) == (True, False)
    assert check({hi: 3}, {hi: 5}) == (False, True)
    assert check({hi: 3}, {}) == (False, True)
    assert check({lo: 1, hi: 3}, {lo: 1, hi: 3}) == (False, False)
    assert check({lo: 1, hi: 3}, {lo: 0, hi: 2}) == (True, True)


# -- pattern and format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("what", "a", "b"), [("pattern", "^a", "^b"), ("format", "uuid", "date-time")])
def test_pattern_and_format(tmp_path, what, a, b):
    def diff(old, new):
        return _field_diff(tmp_path, {"type": "string", **old}, {"type": "string", **new})
    assert _breaks(diff({}, {what: a})) == (True, False)  # newly set
    assert _breaks(diff({what: a}, {})) == (False, True)  # removed
    assert _breaks(diff({what: a}, {what: b})) == (True, True)  # changed: cannot be decided, both
    assert diff({what: a}, {what: a}) == []
    assert diff({what: a}, {what: b})[0].text == f"{what} of `$.x` changes from {json.dumps(a)} to {json.dumps(b)}"


# -- arrays ---------------------------------------------------------------------------------------------------

def test_array_items_are_compared_under_brackets(tmp_path):
    cs = _field_diff(tmp_path, {"type": "array", "items": {"type": "integer"}},
                     {"type": "array", "items": {"type": "string"}})
    assert cs == [Change("$.x[]", "type of `$.x[]` changes from integer to string", True, True)]
    assert _breaks(_field_diff(tmp_path, {"type": "array", "items": {"type": "integer"}},
                               {"type": "array", "items": {"type": "number"}})) == (False, True)
    assert _breaks(_field_diff(tmp_path, {"type": "array"},
                               {"type": "array", "items": {"type": "number"}})) == (True, False)
    assert _breaks(_field_diff(tmp_path, {"type": "array", "items": {"type": "number"}},
                               {"type": "array"})) == (False, True)
    nested = _field_diff(tmp_path, {"type": "array", "items": _obj({"a": {"type": "integer"}})},
                         {"type": "array", "items": _obj({"a": {"type": "integer"}}, required=("a",))})
    assert nested == [Change("$.x[].a", "field `x[].a` becomes required", True, False)]


# -- objects --------------------------------------------------------------------------------------------------

BASE = {"user": {"type": "string"}}


def test_adding_a_required_field(tmp_path):
    cs = _diff(tmp_path, _obj(BASE, ("user",)), _obj({**BASE, "track": {"type": "integer"}}, ("user", "track")))
    assert cs == [Change("$.track", "adds required field `track`", True, True)]  # closed old refuses it too
    cs = _diff(tmp_path, _obj(BASE, closed=False),
               _obj({**BASE, "track": {}}, ("track",), closed=False))
    assert cs == [Change("$.track", "adds required field `track`", True, False)]


def test_adding_an_optional_field_to_a_closed_schema_breaks_forward_only(tmp_path):
    cs = _diff(tmp_path, _obj(BASE), _obj({**BASE, "track": {"type": "integer"}}))
    assert cs == [Change("$.track", "adds optional field `track`", False, True)]


@pytest.mark.parametrize(("field", "back"), [
    ({"type": "integer"}, True),  # old events may hold `track` with any value
    ({}, False),
    (True, False),
    ({"description": "anything", "x-owner": "team"}, False),  # annotations only: still anything
    ({"enum": ["a"]}, True),
])
def test_adding_an_optional_field_to_an_open_schema(tmp_path, field, back):
    cs = _diff(tmp_path, _obj(BASE, closed=False), _obj({**BASE, "track": field}, closed=False))
    assert len(cs) == 1 and cs[0].path == "$.track"
    assert cs[0].text.startswith("adds optional field `track`")
    assert (cs[0].breaks_backward, cs[0].breaks_forward) == (back, False)
    if back:
        assert "undeclared fields were allowed" in cs[0].text


def test_adding_a_field_where_undeclared_fields_have_a_schema(tmp_path):
    old = {"type": "object", "additionalProperties": {"type": "integer"}}
    cs = _diff(tmp_path, old, {"type": "object", "properties": {"n": {"type": "integer"}}})
    assert cs == [  # `n` was an integer before; other undeclared fields are now any value
        Change("$.n", "adds optional field `n`", False, False),
        Change("$.*", "type of `$.*` changes from integer to any value", False, True),
    ]
    [c] = [c for c in _diff(tmp_path, old, {"type": "object", "properties": {"n": {"type": "number"}},
                                            "additionalProperties": False}) if c.path == "$.n"]
    assert (c.breaks_backward, c.breaks_forward) == (False, True)
    [c] = [c for c in _diff(tmp_path, old, {"type": "object", "properties": {"n": {"type": "string"}},
                                            "additionalProperties": False}) if c.path == "$.n"]
    assert (c.breaks_backward, c.breaks_forward) == (True, True)
    assert c.text == ("adds optional field `n` (undeclared fields were allowed: type of `$.n` changes from "
                      "integer to string)")


def test_removing_fields(tmp_path):
    with_track = {**BASE, "track": {"type": "integer"}}
    # closed new schema: old events holding the field are refused
    assert _diff(tmp_path, _obj(with_track), _obj(BASE)) == [
        Change("$.track", "removes optional field `track`", True, False)]
    assert _breaks(_diff(tmp_path, _obj(with_track, ("track",)), _obj(BASE))) == (True, True)
    # open new schema: new events may hold the field with any value
    cs = _diff(tmp_path, _obj(with_track, closed=False), _obj(BASE, closed=False))
    assert cs == [Change("$.track", "removes optional field `track` (undeclared fields are allowed: type of "
                                    "`$.track` changes from integer to any value)", False, True)]
    assert _breaks(_diff(tmp_path, _obj({**BASE, "track": {}}, closed=False), _obj(BASE, closed=False))) \
        == (False, False)
    # a required field removed: new events may lack it
    cs = _diff(tmp_path, _obj({**BASE, "track": {}}, ("track",), closed=False), _obj(BASE, closed=False))
    assert cs == [Change("$.track", "removes required field `track`", False, True)]


def test_a_field_becoming_required_or_optional(tmp_path):
    props = {**BASE, "track": {"type": "integer"}}
    assert _diff(tmp_path, _obj(props, ("user",)), _obj(props, ("user", "track"))) == [
        Change("$.track", "field `track` becomes required", True, False)]
    assert _diff(tmp_path, _obj(props, ("user", "track")), _obj(props, ("user",))) == [
        Change("$.track", "field `track` becomes optional", False, True)]
    # required without a declaration (open schema): the same rule
    assert _diff(tmp_path, _obj(closed=False), _obj(closed=False, required=("a",))) == [
        Change("$.a", "field `a` becomes required", True, False)]


def test_opening_and_closing_an_object(tmp_path):
    assert _diff(tmp_path, _obj(BASE, closed=False), _obj(BASE)) == [
        Change("$", "the event no longer allows undeclared fields", True, False)]
    assert _diff(tmp_path, _obj(BASE), _obj(BASE, closed=False)) == [
        Change("$", "the event allows undeclared fields", False, True)]
    assert _diff(tmp_path, _obj(BASE, closed=False), {**_obj(BASE, closed=False), "additionalProperties": True}) == []
    cs = _field_diff(tmp_path, _obj({}, closed=False), _obj({}))
    assert cs == [Change("$.x", "`$.x` no longer allows undeclared fields", True, False)]


def test_undeclared_field_schemas_are_compared_under_star(tmp_path):
    def m(t):
        return {"type": "object", "additionalProperties": {"type": t}}
    assert _field_diff(tmp_path, m("integer"), m("number")) == [
        Change("$.x.*", "type of `$.x.*` changes from integer to number", False, True)]
    assert _breaks(_field_diff(tmp_path, {"type": "object"}, m("integer"))) == (True, False)
    assert _breaks(_field_diff(tmp_path, m("integer"), {"type": "object"})) == (False, True)


def test_nested_objects_and_refs_into_other_files(tmp_path):
    geo1 = {"$defs": {"point": _obj({"lat": {"type": "number"}, "lon": {"type": "number"}}, ("lat",))}}
    geo2 = {"$defs": {"point": _obj({"lat": {"type": "number"}, "lon": {"type": "number"},
                                     "alt": {"type": "integer", "minimum": 0}}, ("lat", "lon"))}}
    v1 = _obj({"geo": {"$ref": "../common/geo1.json#/$defs/point"}})
    v2 = _obj({"geo": {"$ref": "../common/geo2.json#/$defs/point"}})
    v = _versions(tmp_path, v1, v2, extra={"common/geo1.json": geo1, "common/geo2.json": geo2})
    assert changes(v[1].root, v[2].root) == [
        Change("$.geo.lon", "field `geo.lon` becomes required", True, False),
        Change("$.geo.alt", "adds optional field `geo.alt`", False, True),
    ]
    assert check_chain("play", v, "full") == [
        "play v2 field `geo.lon` becomes required: not backward compatible with v1",
        "play v2 adds optional field `geo.alt`: not forward compatible with v1",
    ]


def test_annotations_are_not_changes(tmp_path):
    old = _obj({"track": {"type": "integer", "title": "Track", "x-pii": False}}, title="Play",
               description="one play")
    new = _obj({"track": {"type": "integer", "description": "the track id", "x-pii": True, "examples": [1]}},
               **{"x-owner": "music", "$comment": "v2"})
    assert _diff(tmp_path, old, new) == []


def test_several_changes_are_listed_in_order(tmp_path):
    old = _obj({"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "string"}}, ("a",))
    new = _obj({"a": {"type": "number", "maximum": 3}, "d": {"type": "boolean"}, "c": {"type": "string"}},
               ("a", "d"))
    assert _diff(tmp_path, old, new) == [
        Change("$.a", "type of `$.a` changes from integer to number", False, True),
        Change("$.a", "maximum of `$.a` set to 3", True, False),
        Change("$.d", "adds required field `d`", True, True),
        Change("$.b", "removes optional field `b`", True, False),
    ]


# -- check_chain ----------------------------------------------------------------------------------------------

V1 = _obj({"user": {"type": "string"}}, ("user",))
V2 = _obj({"user": {"type": "string"}, "track": {"type": "integer"}}, ("user", "track"))  # breaks backward
V3 = _obj({"user": {"type": "string"}, "track": {"type": "integer"}, "ms": {"type": "integer"}},
          ("user", "track"))  # compatible with v2 (backward), not with v1


def test_the_message_format(tmp_path):
    v = _versions(tmp_path, V1, V2)
    assert check_chain("play", v, "backward") == [
        "play v2 adds required field `track`: not backward compatible with v1"]
    assert check_chain("play", v, "forward") == [
        "play v2 adds required field `track`: not forward compatible with v1"]
    assert check_chain("play", v, "full") == [
        "play v2 adds required field `track`: not backward compatible with v1",
        "play v2 adds required field `track`: not forward compatible with v1",
    ]
    assert check_chain("play", v, "none") == []


def test_transitive_modes_check_every_earlier_version(tmp_path):
    v = _versions(tmp_path, V1, V2, V3)
    assert check_chain("play", v, "backward") == [
        "play v2 adds required field `track`: not backward compatible with v1"]
    assert check_chain("play", v, "backward_transitive") == [
        "play v2 adds required field `track`: not backward compatible with v1",
        "play v3 adds required field `track`: not backward compatible with v1",
    ]
    assert check_chain("play", v, "forward") == [
        "play v2 adds required field `track`: not forward compatible with v1",
        "play v3 adds optional field `ms`: not forward compatible with v2",
    ]
    assert check_chain("play", v, "forward_transitive") == [
        "play v2 adds required field `track`: not forward compatible with v1",
        "play v3 adds optional field `ms`: not forward compatible with v2",
        "play v3 adds required field `track`: not forward compatible with v1",
        "play v3 adds optional field `ms`: not forward compatible with v1",
    ]
    full = check_chain("play", v, "full_transitive")
    assert len(full) == 6 and "play v3 adds required field `track`: not backward compatible with v1" in full
    assert check_chain("play", v, "none") == []


def test_a_compatible_chain_is_empty_in_its_mode_and_the_mode_matters(tmp_path):
    v1 = _obj({"user": {"type": "string"}})
    v2 = _obj({"user": {"type": "string"}, "track": {"type": "integer"}})  # optional field, closed: backward
    v3 = _obj({"user": {"type": ["string", "null"]}, "track": {"type": "number"}})  # widened: backward
    v = _versions(tmp_path, v1, v2, v3)
    for mode in ("backward", "backward_transitive", "none"):
        assert check_chain("play", v, mode) == [], mode
    assert check_chain("play", v, "forward") == [
        "play v2 adds optional field `track`: not forward compatible with v1",
        "play v3 type of `$.user` changes from string to null or string: not forward compatible with v2",
        "play v3 type of `$.track` changes from integer to number: not forward compatible with v2",
    ]
    assert len(check_chain("play", v, "full_transitive")) == 3 + 2  # v3 against v1: user, track
    assert check_chain("play", _versions(tmp_path / "one", v1), "full_transitive") == []


def test_gaps_in_version_numbers_compare_with_the_previous_one_there_is(tmp_path):
    v = _versions(tmp_path, V1, V2, numbers=[1, 5])
    assert check_chain("play", v, "backward") == [
        "play v5 adds required field `track`: not backward compatible with v1"]


def test_an_unknown_mode_is_refused():
    with pytest.raises(SchemaError, match="compatibility mode 'sideways'"):
        check_chain("play", {}, "sideways")
    assert set(MODES) == {"backward", "backward_transitive", "forward", "forward_transitive", "full",
                          "full_transitive", "none"}


# -- soundness against the validator ---------------------------------------------------------------------------

CATALOG: list[Any] = [
    {}, {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": ["string", "null"]},
    {"type": "null"}, {"type": "boolean"}, {"type": ["integer", "boolean"]},
    {"enum": ["a", "b"]}, {"enum": ["a"]}, {"enum": [1, 2]}, {"enum": [None, "a"]}, {"const": 1},
    {"type": "integer", "minimum": 1}, {"type": "integer", "exclusiveMinimum": 0}, {"type": "integer", "maximum": 10},
    {"type": "integer", "minimum": 0.5, "maximum": 2}, {"type": "number", "minimum": 0.5},
    {"type": "number", "exclusiveMaximum": 10}, {"type": "number", "minimum": 1, "maximum": 2},
    {"type": "number", "minimum": 0}, {"type": "number", "exclusiveMinimum": 0},
    {"type": "integer", "exclusiveMaximum": 2}, {"type": "integer", "maximum": 1.5}, {"type": "integer", "minimum": 0},
    {"type": "string", "minLength": 1}, {"type": "string", "maxLength": 2}, {"type": "string", "pattern": "^a"},
    {"type": "string", "format": "uuid"}, {"type": "string", "format": "date-time"},
    {"type": "array"}, {"type": "array", "items": {"type": "integer"}},
    {"type": "array", "items": {"type": "number"}, "maxItems": 1}, {"type": "array", "minItems": 1},
    {"type": "array", "items": {"enum": ["a"]}},
    {"type": "object"}, {"type": "object", "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer"}}},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "number"}, "b": {}}, "additionalProperties": False},
    {"type": "object", "properties": {"b": {"type": "integer"}}},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object", "additionalProperties": {"type": "string"}},
]
SAMPLES: list[Any] = [
    None, True, False, 0, 1, 2, 5, 10, 11, -1, 0.5, 1.0, 1.5, 2.5, 9.5, "", "a", "b", "ab", "abc", "xyz",
    "2024-01-01T00:00:00Z", "123e4567-e89b-12d3-a456-426614174000", [], [1], [1, 2, 3], ["a"], [0.5], [None],
    {}, {"a": 1}, {"a": "s"}, {"a": 1.5}, {"b": 1}, {"b": "s"}, {"a": 1, "b": 2}, {"c": 1}, {"c": "s"},
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> list[tuple[Node, list[bool]]]:
    """Each catalog schema as the field ``x`` of an event, with which samples it accepts."""
    root = tmp_path_factory.mktemp("catalog")
    out = []
    for i, field in enumerate(CATALOG):
        v = _versions(root, _obj({"x": field}, ("x",)), folder=f"t{i}")
        node = v[1].root
        decoder = msgspec.json.Decoder(compile_node(node, f"t{i}"))
        ok = []
        for s in SAMPLES:
            try:
                decoder.decode(json.dumps({"x": s}).encode())
                ok.append(True)
            except msgspec.ValidationError:
                ok.append(False)
        out.append((node.properties["x"], ok))
    return out


def test_changes_is_sound_against_the_validator(catalog):
    """Where ``changes`` says a change keeps old (new) documents valid, every
    sample valid under one is valid under the other; and a break it reports
    has a witness among the samples in most pairs (the catalog is not vacuous)."""
    witnessed = unwitnessed = 0
    for (a, va), (b, vb) in itertools.product(catalog, repeat=2):
        cs = changes(a, b, "$.x")
        back, fwd = _breaks(cs)
        old_only = [SAMPLES[i] for i in range(len(SAMPLES)) if va[i] and not vb[i]]
        new_only = [SAMPLES[i] for i in range(len(SAMPLES)) if vb[i] and not va[i]]
        if not back:
            assert not old_only, (a, b, cs, old_only)
        if not fwd:
            assert not new_only, (a, b, cs, new_only)
        for broken, witnesses in ((back, old_only), (fwd, new_only)):
            if broken:
                witnessed, unwitnessed = (witnessed + 1, unwitnessed) if witnesses else (witnessed, unwitnessed + 1)
        if a is b:
            assert cs == []
    print(f"{witnessed} breaks with a witness, {unwitnessed} without")
    assert witnessed > 1000
    assert unwitnessed < witnessed // 20, (witnessed, unwitnessed)
