"""Personal fields declared in schemas: what `schema check` accepts and refuses, with the file."""

from __future__ import annotations

import json

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
