"""Personal fields declared in schemas: what `schema check` accepts and refuses, with the file."""

from __future__ import annotations

import json
import os

import pytest

from eventbroker.config import Config, EventTypeConfig, SchemasConfig, resolve_types
from eventbroker.errors import SchemaError
from eventbroker.schema import load_registry

BASE = {
    "type": "object",
    "properties": {"user": {"type": "string", "x-user": True}, "track": {"type": "integer"},
                   "client_ip": {"type": "string", "x-personal": True}},
    "required": ["user", "track"],
    "additionalProperties": False,
}


def _load(tmp_path, *docs, **type_opts):
    folder = tmp_path / "schemas" / "play"
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs, 1):
        (folder / f"{i}.json").write_text(json.dumps(doc))
    cfg = Config(schemas=SchemasConfig(dir=str(tmp_path / "schemas")),
                 types={"play": EventTypeConfig(schema="play", **type_opts)})
    return load_registry(cfg, resolve_types(cfg))


def _with(**props):
    doc = json.loads(json.dumps(BASE))
    for k, v in props.items():
        if v is None:
            doc["properties"].pop(k)
        else:
            doc["properties"][k] = v
    return doc


def test_a_version_with_personal_fields_gets_native_fields(tmp_path):
    reg = _load(tmp_path, BASE)
    sv = reg.get("play").resolve(0)
    assert sv.personal_fields == ("user", ("client_ip",))
    assert sv.personal.user_field == b"user" and sv.personal.fields == (b"client_ip",)
    assert reg.has_personal


def test_a_type_without_personal_fields_pays_nothing(tmp_path):
    reg = _load(tmp_path, _with(client_ip={"type": "string"}))
    assert reg.get("play").resolve(0).personal is None and not reg.has_personal


def test_user_field_may_come_from_the_type_setting(tmp_path):
    doc = _with(user={"type": "integer"})
    reg = _load(tmp_path, doc, user_field="user")
    assert reg.get("play").resolve(0).personal_fields.user_field == "user"


@pytest.mark.parametrize("doc, words", [
    (_with(user={"type": "string"}), "no user field"),
    (_with(user={"type": ["string", "null"], "x-user": True}), "must be a string or an integer"),
    (_with(user={"type": "string", "x-user": True, "x-personal": True}), "cannot be x-personal"),
    (_with(track={"type": "integer", "x-user": True}), "x-user marks"),
    (_with(geo={"type": "object", "properties": {"ip": {"type": "string", "x-personal": True}}}),
     "$.geo.ip: only top-level"),
    (_with(client_ip={"type": "string", "x-personal": "yes"}), "must be true or false"),
    ({**BASE, "required": ["track"]}, "must be required"),
])
def test_bad_declarations_are_refused_with_the_file(tmp_path, doc, words):
    with pytest.raises(SchemaError) as e:
        _load(tmp_path, doc)
    assert words in str(e.value) and "1.json" in str(e.value)


def test_a_field_stays_personal_in_later_versions(tmp_path):
    v2 = _with(client_ip={"type": "string"})
    with pytest.raises(SchemaError, match="client_ip is personal in v1 and must stay x-personal"):
        _load(tmp_path, BASE, v2)


def test_a_personal_type_cannot_dead_letter(tmp_path):
    with pytest.raises(SchemaError, match="cannot dead-letter"):
        _load(tmp_path, BASE, on_invalid="dead_letter")


def test_what_is_personal_in_one_version_is_sealed_in_every_version(tmp_path):
    """An open version that no longer declares a personal field must not let it through in clear."""
    from test_personal_native import NOW, _batch, _open, _ring_payloads

    from eventbroker import _fastpath as fp

    v1 = {**BASE, "additionalProperties": True}
    v2 = _with(client_ip=None)
    v2["additionalProperties"] = True
    reg = _load(tmp_path, v1, v2)
    ts = reg.get("play")
    assert ts.resolve(1).personal_fields == ts.resolve(2).personal_fields == ("user", ("client_ip",))
    ring = fp.TypeRing("play", capacity_bytes=1 << 20, max_event_bytes=1 << 16)
    ring.schemas = ts
    key = os.urandom(32)
    ring.keys = fp.UserKeys()
    ring.keys.keys[b"a"] = key
    sp = fp.BatchSplitter(max_events_per_batch=100, max_event_bytes=1 << 16)
    sp.add(ring)
    eid = os.urandom(16)
    r = fp.FrameReader(1 << 20)
    r.feed(_batch([(eid, b'{"user":"a","track":1,"client_ip":"SECRET"}')]))
    assert r.next_frame() >= 0
    assert sp.ingest_answering(r, NOW, None)[2][0][1] == fp.STATUS_ACCEPTED  # written against v2, the latest
    (got,) = _ring_payloads(ring)
    assert _open(key, b"client_ip", eid, got["client_ip"]) == b'"SECRET"'


def test_versions_must_agree_on_the_user_field(tmp_path):
    v2 = _with(user={"type": "string"}, owner={"type": "string", "x-user": True})
    v2["required"] = ["user", "track", "owner"]
    with pytest.raises(SchemaError, match="different user fields"):
        _load(tmp_path, BASE, v2)
