"""The native accept-path for flat, closed schemas (``_native/flat_schema.pxi``)
only ever accepts what both the compiled msgspec type and the reference
validator (jsonschema) accept; the rest it hands on."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbroker.schema.compile import flat_schema
from eventbroker.schema.model import read_versions
from eventbroker.schema.validate import BatchValidator

UUID = "6f1c2a9e-4d2b-4c8e-9a51-3f1f0f6b7e21"
STRINGS = ["", "a", "ab", "abc", "x" * 40, "é", "a\"b", "a\\b", "a\nb", UUID, UUID.upper(), UUID.replace("-", ""),
           UUID[:-1] + "g", "2026-12-02T11:08:34.233Z", "2026-12-02T11:08:34Z", "2026-12-02T11:08:34+01:00",
           "2026-12-02T11:08:34-00:30", "2026-02-29T00:00:00Z", "2024-02-29T00:00:00Z", "2026-13-01T00:00:00Z",
           "2026-12-02t11:08:34z", "2026-12-02 11:08:34Z", "2026-12-02T11:08:60Z", "2026-12-02T24:00:00Z",
           "2026-12-02T11:08:34.1234567890Z", "2026-12-02T11:08:34", "album", "radio", "other"]
NUMBERS = [0, 1, -1, 5, 10, 11, -10, 2**40, 10**18, 10**20, -(10**19), 1.5, 0.0, -0.5, 1e3]
VALUES = st.one_of(st.sampled_from(STRINGS), st.sampled_from(NUMBERS), st.booleans(), st.none(),
                   st.just([1]), st.just({"a": 1}))


@st.composite
def field_schemas(draw):
    kind = draw(st.sampled_from(["string", "integer", "number", "boolean", "enum", "uuid", "date-time"]))
    s: dict = {}
    if kind == "enum":
        s["enum"] = draw(st.lists(st.sampled_from(["album", "radio", "other", "a", ""]), min_size=1, max_size=3,
                                  unique=True))
        if draw(st.booleans()):
            s["enum"].append(None)
        return s
    if kind in ("uuid", "date-time"):
        s = {"type": "string", "format": kind}
    else:
        s = {"type": kind}
    if kind == "string":
        if draw(st.booleans()):
            s["minLength"] = draw(st.integers(0, 3))
        if draw(st.booleans()):
            s["maxLength"] = draw(st.integers(0, 41))
    if kind in ("integer", "number"):
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if draw(st.booleans()):
                s[key] = draw(st.sampled_from([-10, -0.5, 0, 1, 1.5, 10, 2**40]))
    if draw(st.integers(0, 3)) == 0:
        s["type"] = [s["type"], "null"]
    return s


@st.composite
def flat_schemas(draw):
    names = draw(st.lists(st.sampled_from(["user", "track", "ts", "id", "n", "ok", "c"]), min_size=1, max_size=6,
                          unique=True))
    props = {n: draw(field_schemas()) for n in names}
    required = draw(st.lists(st.sampled_from(names), unique=True))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def documents(draw, schema):
    names = list(schema["properties"]) + ["zz"]
    doc = {n: draw(VALUES) for n in draw(st.lists(st.sampled_from(names), unique=True))}
    text = json.dumps(doc, separators=(",", ":")).encode()
    variant = draw(st.integers(0, 5))
    if variant == 1:
        text = json.dumps(doc, indent=1).encode()
    elif variant == 2 and doc:  # a duplicate key
        k = next(iter(doc))
        text = text[:-1] + b',"' + k.encode() + b'":' + json.dumps(draw(VALUES)).encode() + b"}"
    elif variant == 3:
        text = text.replace(b":1,", b":01,").replace(b":0,", b":-0,")
    elif variant == 4:
        text = b" " + text + b"\n"
    elif variant == 5:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _load(tmp_path: Path, schema: dict):
    d = tmp_path / "t"
    d.mkdir(exist_ok=True)
    (d / "1.json").write_text(json.dumps(schema))
    return read_versions(tmp_path, "t")[1].root


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_native_path_accepts_only_what_msgspec_and_jsonschema_accept(tmp_path, data):
    schema = data.draw(flat_schemas())
    root = _load(tmp_path, schema)
    flat = flat_schema(root)
    assert flat is not None  # every generated schema is flat and closed
    checker = BatchValidator(root, "t")
    reference = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for _ in range(20):
        text = data.draw(documents(schema))
        if not flat.accepts(text):
            continue
        assert checker.check_one(text) is None, (schema, text)
        doc = json.loads(text)
        if not any(isinstance(v, str) and "T" in v and ":" in v for v in doc.values()):
            # (jsonschema's date-time check needs an optional package; msgspec checks it)
            assert reference.is_valid(doc), (schema, text)


def test_the_native_path_takes_the_common_event_and_hands_on_the_rest(tmp_path):
    root = _load(tmp_path, json.loads((Path(__file__).parents[2] / "benchmarks/schemas/bench/1.json").read_text()))
    flat = flat_schema(root)
    ok = (b'{"user":"u1","track":1,"ms_played":2,"context":"radio","offline":false,"device":"ios","country":"SE",'
          b'"ts":"2026-12-02T11:08:34.233Z","session":"' + UUID.encode() + b'","seq":3}')
    assert flat.accepts(ok)
    for bad in (ok.replace(b'"track":1', b'"track":-1'), ok.replace(b"SE", b"SWE"), ok.replace(b"radio", b"tv"),
                ok.replace(b"11:08", b"25:08"), ok.replace(b"-4d2b", b"4d2b-"), ok.replace(b'"seq":3}', b'"seq":3,}'),
                ok + b"x", ok.replace(b'"u1"', b'"\\u0075"'), ok.replace(b'"u1"', "\"é\"".encode())):
        assert not flat.accepts(bad), bad
    assert BatchValidator(root, "t").check_one(ok.replace(b'"u1"', b'"\\u0075"')) is None  # msgspec takes it


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}, "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "string"}}},  # open
    {"type": "object", "properties": {"a": {"type": "array"}}, "additionalProperties": False},
    {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "additionalProperties": False},
])
def test_schemas_the_native_path_does_not_cover_use_msgspec_alone(tmp_path, schema):
    assert flat_schema(_load(tmp_path, schema)) is None
