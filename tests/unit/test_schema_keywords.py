"""Every supported JSON Schema keyword (``model.SUPPORTED``), by example and
by property, against the reference validator (the ``jsonschema`` package).

Each example is checked three ways: ``BatchValidator.check_one``; the batch
path through the real native splitter (``BatchSplitter.ingest_answering``
with ``TypeSchemas`` on the ring: the native scan, the flat accept-path for
flat closed schemas, then msgspec on the joined part); and
``jsonschema.Draft202012Validator``. Unsupported keywords are refused with the
file and the keyword.

Documented divergences, not generated here:

* an ``integer`` (or an integer ``enum``/``const`` value) is a JSON number
  without a fraction or exponent: ``1.0`` is refused (JSON Schema accepts it);
* a ``number`` is compared as a float: integers beyond 2**53 lose precision
  against a bound (``9007199254740993`` passes ``maximum: 9007199254740992``);
* ``format: uuid`` is strictly 8-4-4-4-12: jsonschema also takes extra dashes
  (``...-3f1f0f6b-7e21``); both refuse a trailing newline, jsonschema's
  date-time takes one (``$`` in its regex), the gateway does not;
* ``pattern``: Python's ``re``, not ECMA-262 (only simple patterns here);
* invalid UTF-8 inside a field that an open schema does not declare is not
  looked at (msgspec skips such values unread).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from eventbroker import _fastpath as fp
from eventbroker.config import EventType
from eventbroker.errors import SchemaError
from eventbroker.schema.model import ANNOTATIONS, SUPPORTED, Version, read_versions
from eventbroker.schema.registry import TypeSchemas
from eventbroker.schema.validate import RULES, BatchValidator

HAS_DATE_TIME = "date-time" in jsonschema.FormatChecker().checkers  # needs rfc3339-validator
BASE = "file:///schemas/"
ET = EventType(name="t", topic="events.t", priority="normal", max_event_bytes=65536, partitioning="key",
               ring_bytes=1 << 24, enabled=True, schema="t")
U = "6f1c2a9e-4d2b-4c8e-9a51-3f1f0f6b7e21"


# -------------------------------------------------------------------- helpers


def write_schemas(root: Path, top: Any, files: dict[str, Any] | None = None) -> Version:
    """``top`` as ``root/t/1.json`` (and ``files`` by relative path), read back."""
    for rel, doc in {"t/1.json": top, **(files or {})}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc), encoding="utf-8")
    return read_versions(root, "t")[1]


def reference(version: Version) -> jsonschema.Draft202012Validator:
    """jsonschema over the same files (``$ref`` to other files resolves in a registry)."""
    registry: Registry = Registry().with_resources(
        (BASE + rel.replace("\\", "/"), DRAFT202012.create_resource(doc)) for rel, doc in version.document.items())
    return jsonschema.Draft202012Validator({"$ref": BASE + "t/1.json"}, registry=registry,
                                           format_checker=jsonschema.FormatChecker())


def through_splitter(version: Version, payloads: list[bytes]) -> tuple[dict[int, str], Counter, int]:
    """One batch of ``payloads`` (type ``t``) through the native splitter:
    (rejected batch index -> detail, rules counted, events counted valid)."""
    schemas = TypeSchemas(ET, {1: version}, {})
    ring = fp.TypeRing("t", capacity_bytes=1 << 24, max_event_bytes=65536)
    ring.schemas = schemas
    splitter = fp.BatchSplitter(max_events_per_batch=4096, max_event_bytes=65536)
    splitter.add(ring)
    enc = fp.BatchEncoder()
    for i, p in enumerate(payloads):
        enc.add(b"t", (i + 1).to_bytes(16, "big"), 1, None, p)
    reader = fp.FrameReader(1 << 26)
    reader.feed(enc.finish(7))
    reader.next_frame()
    seq, names, results, *_ = splitter.ingest_answering(reader, 10)
    assert (seq, names) == (7, [b"t"])
    rejected: dict[int, str] = {}
    accepted = 0
    for _ti, status, reason, count, indices, _ring, details in results:
        if status == fp.STATUS_ACCEPTED:
            accepted += count
            continue
        assert (status, reason) == (fp.STATUS_REJECTED, fp.REASON_SCHEMA_VIOLATION)
        assert count == len(indices) == len(details)
        rejected.update(zip(indices, details, strict=True))
    assert accepted + len(rejected) == len(payloads)
    assert ring.pending_events == accepted
    stats = schemas.versions[1].stats
    assert stats.validated == accepted
    return rejected, Counter(stats.invalid), stats.validated


def path_of(detail: str) -> str:
    return detail.partition(": ")[0]


def text(value: Any) -> bytes:
    """A table value as JSON text: bytes are JSON text already."""
    return value if isinstance(value, bytes) else orjson.dumps(value)


# ------------------------------------------------------ 1. keyword by keyword


@dataclass
class Case:
    id: str
    keyword: str  # the SUPPORTED keyword it is about
    schema: Any  # the schema of field $.v, or (root=True) the whole top-level schema
    accept: list[Any]  # values (bytes: JSON text)
    reject: list[tuple[Any, str, str]]  # (value, rule, JSON path in the detail)
    root: bool = False
    defs: dict[str, Any] = field(default_factory=dict)  # top-level $defs
    files: dict[str, Any] = field(default_factory=dict)  # other files of the schemas folder

    def top(self, closed: bool) -> Any:
        if self.root:
            return self.schema
        s: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                             "properties": {"v": self.schema}, "required": ["v"]}
        if closed:
            s["additionalProperties"] = False
        if self.defs:
            s["$defs"] = self.defs
        return s

    def payload(self, value: Any) -> bytes:
        return text(value) if self.root else b'{"v":' + text(value) + b"}"

    @property
    def cross_check(self) -> bool:
        return HAS_DATE_TIME or "date-time" not in json.dumps([self.schema, self.defs, self.files])


T = "type"
DATE_TIMES_OK = ["2026-12-02T11:08:34Z", "2026-12-02T11:08:34.233+01:00", "2026-12-02t11:08:34z",
                 "2024-02-29T00:00:00Z", "2026-12-02T11:08:34-00:00", "2026-12-02T23:59:59.1234567890+23:59",
                 "2000-02-29T00:00:00Z", "0001-01-01T00:00:00Z"]
DATE_TIMES_BAD = ["2026-12-02 11:08:34Z", "2026-12-02T11:08:34+0100", "2026-02-29T00:00:00Z",
                  "1900-02-29T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-02T11:08:34", "2026-12-02T24:00:00Z",
                  "2026-12-02T11:08:60Z", "0000-01-01T00:00:00Z", "2026-12-02", "2026-12-02T11:08:34.Z",
                  "2026-12-02T11:08:34+24:00", "2026-13-01T00:00:00Z", "2026-12-02T11:08:34Z ",
                  "\u0662026-12-02T11:08:34Z"]
CASES = [
    # type
    Case("type-string", T, {"type": "string"}, ["", "a", "é😀", "x\u0000", "a,b:c]}"],
         [(1, T, "$.v"), (None, T, "$.v"), (True, T, "$.v"), (["a"], T, "$.v")]),
    Case("type-integer", T, {"type": "integer"}, [0, -7, 2**53, 2**63 - 1, -(2**63), b"-0"],
         [(1.5, T, "$.v"), ("1", T, "$.v"), (True, T, "$.v"), (None, T, "$.v"), ({}, T, "$.v")]),
    Case("type-number", T, {"type": "number"}, [0, 1.5, -2.5e-300, 1e300, 10, b"1E2", b"-0.0"],
         [("1", T, "$.v"), (False, T, "$.v"), (None, T, "$.v"), ([1], T, "$.v")]),
    Case("type-boolean", T, {"type": "boolean"}, [True, False],
         [(0, T, "$.v"), ("true", T, "$.v"), (None, T, "$.v")]),
    Case("type-null", T, {"type": "null"}, [None], [(0, T, "$.v"), ("", T, "$.v"), (False, T, "$.v")]),
    Case("type-array", T, {"type": "array"}, [[], [1, "a", None, [{}]]],
         [({}, T, "$.v"), ("[]", T, "$.v"), (0, T, "$.v")]),
    Case("type-object", T, {"type": "object"}, [{}, {"a": [1]}], [([], T, "$.v"), ("{}", T, "$.v"), (None, T, "$.v")]),
    Case("type-list", T, {"type": ["string", "integer"]}, ["a", 3],
         [(1.5, T, "$.v"), (None, T, "$.v"), ([], T, "$.v"), (True, T, "$.v")]),
    Case("type-nullable", T, {"type": ["integer", "null"]}, [None, 3], [("3", T, "$.v"), (1.5, T, "$.v")]),
    Case("type-integer-number", T, {"type": ["integer", "number"]}, [1, 1.5], [("1", T, "$.v")]),
    Case("type-nullable-object", T, {"type": ["object", "null"], "properties": {"x": {"type": "integer"}},
                                     "required": ["x"]},
         [None, {"x": 1}], [({}, "required", "$.v"), ({"x": "1"}, T, "$.v.x"), (1, T, "$.v")]),
    Case("type-nullable-array", T, {"type": ["array", "null"], "items": {"type": "string"}},
         [None, ["a"]], [([1], T, "$.v[0]"), ("a", T, "$.v")]),
    # properties
    Case("properties", "properties",
         {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
         [{}, {"a": 1}, {"a": 1, "b": "x"}, {"c": [None]}],
         [({"a": "x"}, T, "$.a"), ({"b": 1}, T, "$.b"), ({"a": None}, T, "$.a"), ({"a": 1, "b": None}, T, "$.b")],
         root=True),
    Case("properties-nested", "properties",
         {"type": "object", "properties": {"x": {"type": "integer"},
                                           "o": {"type": "object", "properties": {"y": {"type": "boolean"}}}}},
         [{}, {"x": 1, "o": {"y": True}}, {"o": {}}],
         [({"o": {"y": 1}}, T, "$.v.o.y"), ({"x": "1"}, T, "$.v.x"), ({"o": []}, T, "$.v.o")]),
    Case("properties-any", "properties", {"type": "object", "properties": {"x": {}, "y": True}},
         [{}, {"x": None, "y": [1, {"z": "é"}]}], [(1, T, "$.v")]),
    # required
    Case("required", "required",
         {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"]},
         [{"a": 1, "z": None}, {"a": 1, "z": [1]}, {"z": 0, "a": -1, "q": 1}],
         [({"a": 1}, "required", "$"), ({"z": 1}, "required", "$"), ({}, "required", "$"),
          ({"a": "1", "z": 1}, T, "$.a")], root=True),
    Case("required-nested", "required", {"type": "object", "properties": {"x": {"type": "integer"}},
                                         "required": ["x"]},
         [{"x": 1}], [({}, "required", "$.v"), ({"y": 1}, "required", "$.v")]),
    Case("required-top", "required", {"type": "object", "properties": {"v": {"type": "string"}}, "required": ["v"]},
         [{"v": ""}], [({}, "required", "$"), ({"w": "x"}, "required", "$")], root=True),
    # additionalProperties
    Case("additionalProperties-false", "additionalProperties",
         {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
         [{}, {"a": 1}], [({"b": 1}, "additionalProperties", "$"), ({"a": 1, "b": None}, "additionalProperties", "$"),
                          ({"a\nb": 1}, "additionalProperties", "$"), ({"a": 1, "`": 1}, "additionalProperties", "$")],
         root=True),
    Case("additionalProperties-false-nested", "additionalProperties",
         {"type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": False},
         [{}, {"x": 1}], [({"y": 1}, "additionalProperties", "$.v")]),
    Case("additionalProperties-false-empty", "additionalProperties", {"type": "object", "additionalProperties": False},
         [{}], [({"a": 1}, "additionalProperties", "$.v")]),
    Case("additionalProperties-true", "additionalProperties",
         {"type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": True},
         [{}, {"x": 1, "y": "z"}], [({"x": "1", "y": 1}, T, "$.v.x")]),
    Case("additionalProperties-schema", "additionalProperties",
         {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
         [{}, {"a": 1, "b": 0}], [({"a": "x"}, T, "$.v[...]"), ({"a": 1, "b": -1}, "minimum", "$.v[...]")]),
    # enum, const
    Case("enum", "enum", {"enum": ["a", "b", 1, None]}, ["a", "b", 1, None],
         [("c", "enum", "$.v"), (2, "enum", "$.v"), ("A", "enum", "$.v"), (True, T, "$.v"), ([], T, "$.v")]),
    Case("enum-typed", "enum", {"type": "string", "enum": ["a", "b"]}, ["a", b'"\\u0061"'],
         [("c", "enum", "$.v"), (1, T, "$.v"), (None, T, "$.v")]),
    Case("enum-escapes", "enum", {"enum": ['a"b', "é", "x\\y", "", "a\nb"]}, ['a"b', "é", b'"\\u00e9"', "x\\y", "", "a\nb"],
         [("ab", "enum", "$.v"), ("e", "enum", "$.v"), ("a\\nb", "enum", "$.v")]),
    Case("enum-integers", "enum", {"type": ["integer", "null"], "enum": [0, 7, None]}, [0, 7, None],
         [(1, "enum", "$.v"), (-7, "enum", "$.v"), ("7", T, "$.v")]),
    Case("const-string", "const", {"const": "x"}, ["x"], [("y", "enum", "$.v"), ("X", "enum", "$.v"), (1, T, "$.v")]),
    Case("const-integer", "const", {"const": 3}, [3], [(4, "enum", "$.v"), ("3", T, "$.v"), (3.5, T, "$.v")]),
    Case("const-null", "const", {"const": None}, [None], [(0, T, "$.v"), (False, T, "$.v")]),
    # arrays
    Case("items", "items", {"type": "array", "items": {"type": "integer"}}, [[], [1, 2, -3]],
         [([1, "a"], T, "$.v[1]"), ([1.5], T, "$.v[0]"), ([None], T, "$.v[0]"), ({}, T, "$.v")]),
    Case("items-objects", "items", {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                               "required": ["x"]}},
         [[{"x": 1}], []], [([{"x": 1}, {}], "required", "$.v[1]"), ([{"x": "1"}], T, "$.v[0].x")]),
    Case("items-nested", "items", {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}},
         [[[True], []]], [([[True], [1]], T, "$.v[1][0]")]),
    Case("minItems", "minItems", {"type": "array", "minItems": 2}, [[1, 2], [1, 2, 3]],
         [([], "minItems", "$.v"), ([1], "minItems", "$.v")]),
    Case("maxItems", "maxItems", {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, [[], [1, 2]],
         [([1, 2, 3], "maxItems", "$.v"), ([1, "x"], T, "$.v[1]")]),
    # numbers
    Case("minimum-integer", "minimum", {"type": "integer", "minimum": 0}, [0, 5], [(-1, "minimum", "$.v")]),
    Case("minimum-integer-fraction", "minimum", {"type": "integer", "minimum": 1.5}, [2, 3],
         [(1, "minimum", "$.v"), (-2, "minimum", "$.v")]),
    Case("minimum-number", "minimum", {"type": "number", "minimum": 0.5}, [0.5, 1, 2.5],
         [(0.4999, "minimum", "$.v"), (0, "minimum", "$.v")]),
    Case("minimum-nullable", "minimum", {"type": ["integer", "null"], "minimum": 0}, [None, 0],
         [(-1, "minimum", "$.v")]),
    Case("maximum-integer", "maximum", {"type": "integer", "maximum": 10}, [10, -3], [(11, "maximum", "$.v")]),
    Case("maximum-integer-fraction", "maximum", {"type": "integer", "maximum": 9.5}, [9], [(10, "maximum", "$.v")]),
    Case("maximum-number", "maximum", {"type": "number", "maximum": 1.5}, [1.5, 1, -1e300],
         [(1.6, "maximum", "$.v"), (2, "maximum", "$.v")]),
    Case("exclusiveMinimum-integer", "exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 0}, [1],
         [(0, "minimum", "$.v"), (-1, "minimum", "$.v")]),
    Case("exclusiveMinimum-integer-fraction", "exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 1.5}, [2],
         [(1, "minimum", "$.v")]),
    Case("exclusiveMinimum-number", "exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0.5}, [0.51, 1],
         [(0.5, "minimum", "$.v"), (0, "minimum", "$.v")]),
    Case("exclusiveMaximum-integer", "exclusiveMaximum", {"type": "integer", "exclusiveMaximum": 10}, [9, -100],
         [(10, "maximum", "$.v")]),
    Case("exclusiveMaximum-integer-fraction", "exclusiveMaximum", {"type": "integer", "exclusiveMaximum": 9.5},
         [9], [(10, "maximum", "$.v")]),
    Case("exclusiveMaximum-number", "exclusiveMaximum", {"type": "number", "exclusiveMaximum": -0.5}, [-0.51, -1],
         [(-0.5, "maximum", "$.v"), (0, "maximum", "$.v")]),
    Case("bounds-together", "minimum", {"type": "integer", "minimum": 0, "maximum": 0}, [0],
         [(1, "maximum", "$.v"), (-1, "minimum", "$.v")]),
    # strings
    Case("minLength", "minLength", {"type": "string", "minLength": 2}, ["ab", "é😀", "abc", b'"\\u00e9\\u00e9"'],
         [("a", "minLength", "$.v"), ("", "minLength", "$.v"), ("😀", "minLength", "$.v"), (b'"\\ud83d\\ude00"',
                                                                                              "minLength", "$.v")]),
    Case("maxLength", "maxLength", {"type": "string", "maxLength": 3}, ["", "abc", "ééé", "😀😀😀"],
         [("abcd", "maxLength", "$.v"), ("éééé", "maxLength", "$.v")]),
    Case("length-nullable", "maxLength", {"type": ["string", "null"], "minLength": 1, "maxLength": 1}, [None, "x"],
         [("", "minLength", "$.v"), ("xy", "maxLength", "$.v"), (1, T, "$.v")]),
    Case("pattern", "pattern", {"type": "string", "pattern": "[0-9]{3}"}, ["123", "ab123cd"],
         [("12a", "pattern", "$.v"), ("", "pattern", "$.v")]),
    Case("pattern-anchored", "pattern", {"type": "string", "pattern": "^ab"}, ["abc", "ab"],
         [("cab", "pattern", "$.v"), (1, T, "$.v")]),
    Case("format-uuid", "format", {"type": "string", "format": "uuid"}, [U, U.upper()],
         [(U.replace("-", ""), "format", "$.v"), (U[:-1] + "g", "format", "$.v"), (U + "\n", "format", "$.v"),
          ("{" + U + "}", "format", "$.v"), (U[:-1], "format", "$.v"), (1, T, "$.v")]),
    Case("format-uuid-length", "format", {"type": "string", "format": "uuid", "maxLength": 36}, [U],
         [("x", "format", "$.v")]),
    Case("format-date-time", "format", {"type": "string", "format": "date-time"}, DATE_TIMES_OK,
         [(s, "format", "$.v") for s in DATE_TIMES_BAD] + [(0, T, "$.v"), (None, T, "$.v")]),
    # anyOf: the nullable union
    Case("anyOf-nullable", "anyOf", {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}, [None, "a"],
         [("", "minLength", "$.v"), (1, T, "$.v")]),
    Case("anyOf-nullable-first", "anyOf", {"anyOf": [{"type": "null"}, {"type": "integer", "maximum": 3}]}, [None, 3],
         [(4, "maximum", "$.v"), ("x", T, "$.v")]),
    Case("anyOf-nullable-enum", "anyOf", {"anyOf": [{"enum": ["a", "b"]}, {"type": "null"}]}, [None, "a"],
         [("c", "enum", "$.v"), (1, T, "$.v")]),
    Case("anyOf-nullable-date-time", "anyOf", {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
         [None, DATE_TIMES_OK[0]], [(DATE_TIMES_BAD[0], "format", "$.v"), (1, T, "$.v")]),
    Case("anyOf-nullable-ref", "anyOf", {"anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]}, [None, {"x": 1}],
         [({}, "required", "$.v"), ({"x": True}, T, "$.v.x")],
         defs={"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}),
    # $ref, $defs
    Case("ref-defs", "$ref", {"$ref": "#/$defs/pos"}, [0, 7], [(-1, "minimum", "$.v"), ("x", T, "$.v")],
         defs={"pos": {"type": "integer", "minimum": 0}}),
    Case("defs-chain", "$defs", {"$ref": "#/$defs/a"}, [[], ["x"]], [(["xy"], "maxLength", "$.v[0]")],
         defs={"a": {"type": "array", "items": {"$ref": "#/$defs/b"}}, "b": {"type": "string", "maxLength": 1},
               "unused": {"type": "integer"}}),
    Case("ref-file-pointer", "$ref", {"$ref": "../common/geo.json#/$defs/point"}, [{"lat": 1.5}, {"lat": -90}],
         [({}, "required", "$.v"), ({"lat": "x"}, T, "$.v.lat"), ({"lat": 91}, "maximum", "$.v.lat"),
          ({"lat": 0, "lon": 0}, "additionalProperties", "$.v")],
         files={"common/geo.json": {"$defs": {"point": {
             "type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
             "required": ["lat"], "additionalProperties": False}}}}),
    Case("ref-file-whole", "$ref", {"$ref": "id.json"}, [U], [("x", "format", "$.v"), (1, T, "$.v")],
         files={"t/id.json": {"type": "string", "format": "uuid"}}),
    Case("ref-file-chain", "$ref", {"$ref": "../common/a.json"}, [{"b": 2}, {}], [({"b": 1.5}, T, "$.v.b")],
         files={"common/a.json": {"type": "object", "properties": {"b": {"$ref": "b.json#/$defs/n"}}},
                "common/b.json": {"$defs": {"n": {"type": "integer"}}}}),
    Case("ref-top", "$ref", {"$ref": "#/$defs/top", "$defs": {"top": {
        "type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"], "additionalProperties": False}}},
         [{"v": 1}], [({}, "required", "$"), ({"v": 1, "w": 1}, "additionalProperties", "$"), ({"v": "1"}, T, "$.v")],
         root=True),
]
PARAMS = [pytest.param(c, closed, id=f"{c.id}-{'root' if c.root else 'closed' if closed else 'open'}")
          for c in CASES for closed in ((None,) if c.root else (False, True))]


def _keys(s: Any) -> set[str]:
    if isinstance(s, dict):
        return set(s) | {k for v in s.values() for k in _keys(v)}
    if isinstance(s, list):
        return {k for v in s for k in _keys(v)}
    return set()


def test_the_table_covers_every_supported_keyword() -> None:
    used = set().union(*(_keys([c.top(False), c.files]) for c in CASES))
    assert set(SUPPORTED) <= used, set(SUPPORTED) - used
    assert set(SUPPORTED) <= {c.keyword for c in CASES}
    assert {r for c in CASES for _, r, _ in c.reject} <= set(RULES)


@pytest.mark.parametrize("case,closed", PARAMS)
def test_keyword_check_one(tmp_path: Path, case: Case, closed: bool) -> None:
    version = write_schemas(tmp_path, case.top(closed), case.files)
    bv = BatchValidator(version.root, "t v1")
    ref = reference(version)
    for value in case.accept:
        p = case.payload(value)
        assert bv.check_one(p) is None, p
        if case.cross_check:
            assert ref.is_valid(json.loads(p)), p
    for value, rule, path in case.reject:
        p = case.payload(value)
        f = bv.check_one(p)
        assert f is not None, p
        assert (f.rule, path_of(f.detail)) == (rule, path), (p, f)
        if case.cross_check:
            assert not ref.is_valid(json.loads(p)), p


@pytest.mark.parametrize("case,closed", PARAMS)
def test_keyword_batch_through_the_splitter(tmp_path: Path, case: Case, closed: bool) -> None:
    version = write_schemas(tmp_path, case.top(closed), case.files)
    items: list[tuple[bytes, tuple[str, str] | None]] = [(case.payload(v), None) for v in case.accept]
    items += [(case.payload(v), (rule, path)) for v, rule, path in case.reject]
    random.Random(case.id).shuffle(items)
    items += items[:3]  # the same payloads again, later in the batch
    rejected, rules, validated = through_splitter(version, [p for p, _ in items])
    expect = {i: e for i, (_, e) in enumerate(items) if e is not None}
    assert sorted(rejected) == sorted(expect)
    bv = BatchValidator(version.root, "t v1")
    for i, (_rule, path) in expect.items():
        assert path_of(rejected[i]) == path, (items[i], rejected[i])
        assert rejected[i] == bv.check_one(items[i][0]).detail  # type: ignore[union-attr]
    assert rules == Counter(rule for rule, _ in expect.values())
    assert validated == len(items) - len(expect)


def test_failures_across_decode_chunks(tmp_path: Path) -> None:
    """More than one decode window (512 payloads): failures at the edges of
    windows, a lone whitespace payload last, are each found at their index."""
    version = write_schemas(tmp_path, {"type": "object", "properties": {"a": {"type": "integer"}}})
    bad = {0: b'{"a":"x"}', 510: b"\n", 511: b'{"a":1.5}', 512: b" ", 513: b'{"a":[]}', 1023: b'{"a":1} {"a":2}',
           1024: b'{"a":"\xff"}', 1098: b'{"a":null}', 1099: b"\t"}
    payloads = [bad.get(i, b'{"a":%d,"b":"\xc3\xa9"}' % i) for i in range(1100)]
    rejected, rules, validated = through_splitter(version, payloads)
    assert sorted(rejected) == sorted(bad)
    assert validated == 1100 - len(bad)
    assert rules == Counter({"type": 4, "json": 5})
    bv = BatchValidator(version.root, "t v1")
    for i, p in bad.items():
        f = bv.check_one(p)
        assert f is not None and f.detail == rejected[i], (i, f, rejected[i])


# --------------------------------------------------- 2. unsupported keywords


def field_schema(frag: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"v": frag}}


UNSUPPORTED = [
    ("oneOf", field_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]}), {}, ["'oneOf'"], "t/1.json"),
    ("allOf", field_schema({"allOf": [{"type": "string"}]}), {}, ["'allOf'"], "t/1.json"),
    ("not", field_schema({"not": {"type": "string"}}), {}, ["'not'"], "t/1.json"),
    ("if-then-else", field_schema({"type": "string", "if": {"minLength": 1}, "then": {}, "else": {}}), {},
     ["'if'"], "t/1.json"),
    ("then", field_schema({"type": "string", "then": {}}), {}, ["'then'"], "t/1.json"),
    ("patternProperties", field_schema({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}), {},
     ["'patternProperties'"], "t/1.json"),
    ("uniqueItems", field_schema({"type": "array", "uniqueItems": True}), {}, ["'uniqueItems'"], "t/1.json"),
    ("prefixItems", field_schema({"type": "array", "prefixItems": [{"type": "integer"}]}), {}, ["'prefixItems'"],
     "t/1.json"),
    ("contains", field_schema({"type": "array", "contains": {"type": "integer"}}), {}, ["'contains'"], "t/1.json"),
    ("multipleOf", field_schema({"type": "integer", "multipleOf": 2}), {}, ["'multipleOf'"], "t/1.json"),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, {}, ["'dependentRequired'"],
     "t/1.json"),
    ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {}}}, {}, ["'dependentSchemas'"], "t/1.json"),
    ("minProperties", {"type": "object", "minProperties": 1}, {}, ["'minProperties'"], "t/1.json"),
    ("maxProperties", field_schema({"type": "object", "maxProperties": 1}), {}, ["'maxProperties'"], "t/1.json"),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}, {}, ["'propertyNames'"], "t/1.json"),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}, {}, ["'unevaluatedProperties'"],
     "t/1.json"),
    ("$dynamicRef", field_schema({"$dynamicRef": "#node"}), {}, ["'$dynamicRef'"], "t/1.json"),
    ("$anchor", field_schema({"type": "string", "$anchor": "s"}), {}, ["'$anchor'"], "t/1.json"),
    ("contentMediaType-deep", field_schema({"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "string", "contentMediaType": "text/html"}}}}), {}, ["'contentMediaType'", "$.v[].x"],
     "t/1.json"),
    ("format-email", field_schema({"type": "string", "format": "email"}), {}, ["format", "'email'"], "t/1.json"),
    ("format-date", field_schema({"type": "string", "format": "date"}), {}, ["format", "'date'"], "t/1.json"),
    ("ref-http", field_schema({"$ref": "https://example.com/s.json"}), {}, ["$ref", "https://example.com/s.json"],
     "t/1.json"),
    ("ref-absolute", field_schema({"$ref": "/etc/s.json"}), {}, ["$ref", "/etc/s.json"], "t/1.json"),
    ("ref-leaves-folder", field_schema({"$ref": "../../outside.json"}), {}, ["$ref", "leaves the schemas folder"],
     "t/1.json"),
    ("ref-missing-file", field_schema({"$ref": "nope.json"}), {}, ["no such schema file"], "t/nope.json"),
    ("ref-missing-pointer", field_schema({"$ref": "#/$defs/nope"}), {}, ["$ref", "#/$defs/nope"], "t/1.json"),
    ("ref-beside-keywords", field_schema({"$ref": "#/$defs/a", "minimum": 1}),
     {}, ["$ref", "minimum"], "t/1.json"),
    ("ref-recursive", {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}},
                       "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}},
     {}, ["$ref", "recursive"], "t/1.json"),
    ("ref-recursive-self", field_schema({"$ref": "#"}), {}, ["$ref", "recursive"], "t/1.json"),
    ("ref-recursive-files", field_schema({"$ref": "../common/a.json"}),
     {"common/a.json": {"type": "object", "properties": {"b": {"$ref": "b.json"}}},
      "common/b.json": {"type": "object", "properties": {"a": {"$ref": "a.json"}}}},
     ["$ref", "recursive"], "common/"),
    ("ref-to-unsupported", field_schema({"$ref": "../common/bad.json"}),
     {"common/bad.json": {"type": "object", "properties": {"x": {"type": "string", "format": "hostname"}}}},
     ["'hostname'"], "common/bad.json"),
    ("anyOf-two-types", field_schema({"anyOf": [{"type": "string"}, {"type": "integer"}]}), {}, ["anyOf"],
     "t/1.json"),
    ("anyOf-three", field_schema({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}), {},
     ["anyOf"], "t/1.json"),
    ("anyOf-beside", field_schema({"anyOf": [{"type": "string"}, {"type": "null"}], "minLength": 1}), {},
     ["anyOf"], "t/1.json"),
    ("schema-draft-07", {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}, {},
     ["$schema", "draft-07"], "t/1.json"),
    ("schema-draft-2019", field_schema({"$schema": "https://json-schema.org/draft/2019-09/schema"}), {},
     ["$schema", "2019-09"], "t/1.json"),
    ("top-not-object", {"type": "array"}, {}, ["top-level", "object"], "t/1.json"),
    ("bound-not-number", field_schema({"type": "integer", "minimum": "1"}), {}, ["minimum"], "t/1.json"),
    ("bound-beyond-float", field_schema({"type": "number", "maximum": 10**400}), {}, ["maximum"], "t/1.json"),
]


@pytest.mark.parametrize("doc,files,mentions,file", [pytest.param(*u[1:], id=u[0]) for u in UNSUPPORTED])
def test_unsupported_keywords_are_refused(tmp_path: Path, doc: Any, files: dict[str, Any], mentions: list[str],
                                          file: str) -> None:
    with pytest.raises(SchemaError) as ei:
        write_schemas(tmp_path, doc, files)
    msg = str(ei.value)
    assert msg.startswith(str(Path(file))), msg
    for m in mentions:
        assert m in msg, (m, msg)
    assert str(tmp_path) not in msg


def test_every_unsupported_example_is_valid_json_schema() -> None:
    """The refused examples are real JSON Schema (the refusal is ours, not a typo)."""
    for id_, doc, files, _m, _f in UNSUPPORTED:
        for d in [doc, *files.values()] if id_ != "bound-not-number" else []:
            if "$schema" not in json.dumps(d):
                jsonschema.Draft202012Validator.check_schema(d)


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\nb", "\u0000"])
def test_field_names_the_validator_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    """msgspec cannot name a field with a quote, a backslash or a control
    character: such a schema is refused when it is compiled, not crashed on."""
    for doc in ({"type": "object", "properties": {name: {"type": "integer"}}},
                {"type": "object", "properties": {"o": {"type": "object", "required": [name]}}}):
        version = write_schemas(tmp_path, doc)
        with pytest.raises(SchemaError, match=r"^t v1(\.o)?: cannot be validated"):
            BatchValidator(version.root, "t v1")
        with pytest.raises(SchemaError):
            TypeSchemas(ET, {1: version}, {})


def test_x_annotations_are_kept_and_ignored_by_validation(tmp_path: Path) -> None:
    doc = {"type": "object", "x-owner": "team-a", "title": "t", "$comment": "c",
           "properties": {"email": {"type": "string", "x-personal": True, "description": "d"},
                          "geo": {"$ref": "#/$defs/g", "x-personal": True},
                          "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "x-personal": {"purpose": "ui"}},
                          "n": {"type": "integer"}},
           "required": ["email"], "additionalProperties": False,
           "$defs": {"g": {"type": "object", "x-note": "n", "properties": {"lat": {"type": "number"}}}}}
    version = write_schemas(tmp_path, doc)
    root = version.root
    assert root.annotations == {"x-owner": "team-a"}
    assert root.properties["email"].annotations == {"x-personal": True}
    assert root.properties["geo"].annotations == {"x-note": "n", "x-personal": True}
    assert root.properties["nick"].annotations == {"x-personal": {"purpose": "ui"}}
    assert root.properties["nick"].types == frozenset({"string", "null"})
    assert root.properties["n"].annotations == {}
    assert root.properties["geo"].properties["lat"].types == frozenset({"number"})
    bv = BatchValidator(root, "t v1")
    ref = reference(version)
    for p, ok in [(b'{"email":"a","geo":{"lat":1},"nick":null}', True), (b'{"email":1}', False),
                  (b'{"email":"a","x-personal":true}', False), (b'{"email":"a","geo":{"lat":"x"}}', False)]:
        assert (bv.check_one(p) is None) is ok is ref.is_valid(json.loads(p)), p
    assert "x-personal" not in ANNOTATIONS and "x-personal" not in SUPPORTED


# ------------------------------------------------------------ 3. properties

NAMES = ["a", "b", "user", "f0", "f1", "é", "a b", ""]
INTS = st.integers(-(2**53), 2**53)
FLOATS = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
SMALL_FLOATS = st.floats(-30, 30, allow_nan=False).filter(lambda f: not f.is_integer())
BOUNDS = st.one_of(st.integers(-20, 20), st.sampled_from([-0.5, 0.5, 1.5, 2.25, -(2**53), 2**53]))
STRINGS = st.one_of(st.text(max_size=6), st.sampled_from(["é😀", "a\"b", "\\", "\n", "\u0000"]))
UUIDS = [U, U.upper(), U.replace("-", ""), U[:-1] + "g", U + "\n", U[:-1], "{" + U + "}"]
DATE_TIME_STRINGS = DATE_TIMES_OK + DATE_TIMES_BAD
JSON = st.recursive(st.none() | st.booleans() | INTS | FLOATS | STRINGS,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=3), c,
                                                                        max_size=4),
                    max_leaves=8)


@st.composite
def scalar_schemas(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["string", "integer", "number", "boolean", "null", "enum", "const", "uuid",
                                 "date-time", "any"]))
    s: dict[str, Any]
    if kind == "any":
        return draw(st.sampled_from([{}, True, {"description": "anything"}]))
    if kind == "enum":
        values = draw(st.lists(st.one_of(st.sampled_from(["a", "b", "", "é", 'a"b']), st.integers(-3, 3), st.none()),
                               min_size=1, max_size=4, unique=True))
        return {"enum": values}
    if kind == "const":
        return {"const": draw(st.one_of(st.sampled_from(["a", "é"]), st.integers(-3, 3), st.none()))}
    if kind in ("uuid", "date-time"):
        s = {"type": "string", "format": kind}
    else:
        s = {"type": kind}
    if kind in ("string", "uuid"):
        for key in ("minLength", "maxLength"):
            if draw(st.integers(0, 2)) == 0:
                s[key] = draw(st.integers(0, 4) if kind == "string" else st.sampled_from([0, 36, 40]))
    if kind in ("integer", "number"):
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if draw(st.integers(0, 2)) == 0:
                s[key] = draw(BOUNDS)
    if kind != "null":
        how = draw(st.integers(0, 4))
        if how == 0:
            s["type"] = [s["type"], "null"]
        elif how == 1:
            s = {"anyOf": [s, {"type": "null"}][:: draw(st.sampled_from([1, -1]))]}
    return s


@st.composite
def array_schemas(draw: Any, depth: int) -> dict[str, Any]:
    items = draw(st.one_of(st.just({"type": "integer"}),
                           st.fixed_dictionaries({"type": st.just("integer")}, optional={"minimum": BOUNDS,
                                                                                         "maximum": BOUNDS}),
                           object_schemas(depth - 1) if depth > 0 else st.just({"type": "boolean"})))
    s: dict[str, Any] = {"type": "array", "items": items}
    for key in ("minItems", "maxItems"):
        if draw(st.booleans()):
            s[key] = draw(st.integers(0, 3))
    return s


def field_schemas(depth: int) -> st.SearchStrategy:
    options = [scalar_schemas(), array_schemas(depth)]
    if depth > 0:
        options.append(object_schemas(depth - 1))
    return st.one_of(*options)


@st.composite
def object_schemas(draw: Any, depth: int, flat: bool = False) -> dict[str, Any]:
    """``flat``: scalar fields with ASCII names, closed (the native accept-path's kind)."""
    names = draw(st.lists(st.sampled_from(NAMES[:-3] if flat else NAMES), min_size=int(flat), max_size=5,
                          unique=True))
    props = {n: draw(scalar_schemas() if flat else field_schemas(depth)) for n in names}
    closed = False if flat else draw(st.sampled_from([None, True, False]))
    required = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    if closed is not False and draw(st.integers(0, 4)) == 0:
        required.append("zz")  # required, any value
    s: dict[str, Any] = {"type": "object"}
    if props or draw(st.booleans()):
        s["properties"] = props
    if required:
        s["required"] = required
    if closed is not None:
        s["additionalProperties"] = closed
    if not props and not required and closed is not False and draw(st.integers(0, 3)) == 0:  # a map
        s["additionalProperties"] = draw(st.sampled_from([{"type": "integer"}, {"type": ["string", "null"]}]))
    if depth < 2 and draw(st.integers(0, 5)) == 0:
        s["type"] = ["object", "null"]
    return s


def _bounds(s: dict[str, Any]) -> tuple[int, int]:
    """Around the bounds, within +-2**53 (where a float holds every integer)."""
    lo = max([s[k] for k in ("minimum", "exclusiveMinimum") if k in s], default=-50)
    hi = min([s[k] for k in ("maximum", "exclusiveMaximum") if k in s], default=50)
    lo, hi = sorted((lo, hi))
    return max(-(2**53), int(lo) - 2), min(2**53, int(hi) + 2)


@st.composite
def near_values(draw: Any, s: Any) -> Any:
    """A value for schema ``s``: mostly valid, sometimes just off (bounds, a
    missing or extra field, a wrong type), now and then anything."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)
    if s is True or not s or s == {"description": "anything"}:
        return draw(JSON)
    if "anyOf" in s:
        return None if draw(st.integers(0, 3)) == 0 else draw(near_values(next(b for b in s["anyOf"]
                                                                               if b != {"type": "null"})))
    if "enum" in s or "const" in s:
        values = s.get("enum", [s.get("const")])
        return draw(st.sampled_from(values)) if draw(st.integers(0, 3)) else draw(st.one_of(STRINGS, INTS))
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    t = draw(st.sampled_from(types))
    if t == "null":
        return None
    if t == "boolean":
        return draw(st.booleans())
    if t == "integer":
        lo, hi = _bounds(s)
        return draw(st.integers(lo, hi))
    if t == "number":
        lo, hi = _bounds(s)
        return draw(st.one_of(st.integers(lo, hi), SMALL_FLOATS,
                              st.floats(lo, hi).filter(lambda f: not f.is_integer())))
    if t == "string":
        if s.get("format") == "uuid":
            return draw(st.sampled_from(UUIDS))
        if s.get("format") == "date-time":
            return draw(st.sampled_from(DATE_TIME_STRINGS))
        lo, hi = sorted((s.get("minLength", 0), s.get("maxLength", 5)))
        return draw(st.text(min_size=max(0, lo - 1), max_size=hi + 1))
    if t == "array":
        lo, hi = sorted((s.get("minItems", 0), s.get("maxItems", 3)))
        return draw(st.lists(near_values(s["items"]), min_size=max(0, lo - 1), max_size=hi + 1))
    assert t == "object"
    props = s.get("properties", {})
    required = set(s.get("required", []))
    out: dict[str, Any] = {}
    for name, sub in props.items():
        if name in required and draw(st.integers(0, 9)) or name not in required and draw(st.booleans()):
            out[name] = draw(near_values(sub))
    for name in required - props.keys():
        if draw(st.integers(0, 5)):
            out[name] = draw(JSON)
    if draw(st.integers(0, 5)) == 0:
        extra = s.get("additionalProperties", True)
        out[draw(st.sampled_from(["zz", "extra", *NAMES]))] = draw(near_values(extra)) if isinstance(extra, dict) \
            else draw(JSON)
    return out


@st.composite
def schema_and_documents(draw: Any) -> tuple[dict[str, Any], list[Any]]:
    schema = draw(object_schemas(2, flat=draw(st.booleans())))
    schema["type"] = "object"  # an event is an object
    docs = draw(st.lists(st.one_of(near_values(schema), near_values(schema), near_values(schema),
                                   st.dictionaries(st.sampled_from(NAMES), JSON, max_size=5), JSON),
                         min_size=1, max_size=8))
    return schema, docs


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=schema_and_documents())
def test_property_agrees_with_jsonschema_and_the_batch_path(prop_dir: Path, case: tuple[dict, list]) -> None:
    schema, docs = case
    note(json.dumps(schema))
    version = write_schemas(prop_dir, schema)
    bv = BatchValidator(version.root, "t v1")
    ref = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    payloads = [orjson.dumps(d) for d in docs]
    verdicts = []
    for doc, p in zip(docs, payloads, strict=True):
        f = bv.check_one(p)
        if not HAS_DATE_TIME and "date-time" in json.dumps(schema):
            pass  # no reference for date-time: only the two paths are compared
        else:
            assert (f is None) == ref.is_valid(doc), (p, f)
        if f is not None:
            assert f.rule in RULES and f.rule not in ("json", "other"), (p, f)
        verdicts.append(f)
    rejected, rules, _ = through_splitter(version, payloads)
    assert sorted(rejected) == [i for i, f in enumerate(verdicts) if f is not None]
    for i, f in enumerate(verdicts):
        if f is not None:
            assert rejected[i] == f.detail, (payloads[i], f, rejected[i])
    assert rules == Counter(f.rule for f in verdicts if f is not None)


HOSTILE = [b'{"a":1},{"a":2}', b'{"a":"', b'"}', b"1 2", b'{"a":[1', b"2]}", b"]", b'{"a":1}]', b"\n", b" ",
           b"\t\r\n", b'{"a":1} {"a":2}', b'{"a":1}{"a":2}', b'{"a":1]', b"[1}", b'{"a":"x\\"}', b'{"a":01}',
           b'{"a":1,}', b"nul", b'{"a":"\x01"}', b"\xff", b'{"a":"\xff"}', b'{"a":1,"a"}', b'{"a" 1}',
           b'{"a":"x"} 1', b'{"a":[1 2]}', b'{"a":1}\x00', b"[", b"{", b'"', b'{"a":"\\u12"}', b"{}}{", b"[]]["]
VALID = [b'{"a":1}', b'{"a":"x\\u0000"}', b'{"a":"x"}', b' {"a":2}\n', b"{}", b'{"a":"\\u00e9,:"}',
         b'{"a":"]}"}', b'{"a":"\\"}"}', b'{"a":"[{,:"}', b'{"a":-0}', b'{"a":"\xc3\xa9"}']
WRONG = [b'{"a":true}', b'{"b":1}', b'{"a":null}', b'{"a":1.5}', b"[]", b"1", b'"x"', b"null"]  # JSON, not valid


@pytest.mark.parametrize("a_schema", [{"type": ["integer", "string"]},  # flat and closed: the native path
                                      {"type": ["integer", "string", "array"], "items": {"type": "integer"}}],
                         ids=["flat", "msgspec"])
@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.sampled_from([("h", p) for p in HOSTILE] + [("v", p) for p in VALID]
                                      + [("w", p) for p in WRONG]), min_size=1, max_size=40))
def test_property_hostile_payloads_in_any_order(prop_dir: Path, a_schema: dict, picks: list[tuple[str, bytes]]) -> None:
    version = write_schemas(prop_dir, {"type": "object", "properties": {"a": a_schema}, "additionalProperties": False})
    bv = BatchValidator(version.root, "t v1")
    payloads = [p for _, p in picks]
    rejected, rules, validated = through_splitter(version, payloads)
    expect_rules: Counter = Counter()
    for i, (kind, p) in enumerate(picks):
        f = bv.check_one(p)
        if kind == "v":
            assert f is None and i not in rejected, (p, f)
            continue
        assert f is not None and i in rejected, (p, f)
        assert rejected[i] == f.detail, (p, f, rejected[i])
        assert (f.rule == "json") is (kind == "h"), (p, f)
        if kind == "h":
            assert rejected[i] == "$: not valid JSON"
        expect_rules[f.rule] += 1
    assert rules == expect_rules
    assert validated == sum(kind == "v" for kind, _ in picks)
