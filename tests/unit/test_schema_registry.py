"""The registry as a deploy sees it: the sample config, reloads that change a
version in place, the ``schema`` commands, and the ACK's details section."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from eventbroker.cli.main import main
from eventbroker.config import SchemasConfig, load_config, resolve_types
from eventbroker.errors import SchemaError
from eventbroker.protocol import FLAG_REJECTION_DETAILS, Ack, AckEntry, Hello, Reason, Status, Welcome
from eventbroker.schema import load_registry

ROOT = Path(__file__).resolve().parents[2]
V1 = {"type": "object", "properties": {"user": {"type": "string"}, "track": {"type": "integer"}},
      "required": ["user", "track"], "additionalProperties": False}


def _config(tmp_path: Path, versions: list[dict], mode: str = "backward") -> Path:
    (tmp_path / "schemas" / "play").mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(versions, 1):
        (tmp_path / "schemas" / "play" / f"{i}.json").write_text(json.dumps(doc))
    conf = tmp_path / "eventbroker.toml"
    conf.write_text(f'[types.play]\nschema = "play"\ncompatibility = "{mode}"\n')
    return conf


def test_the_sample_config_loads_with_its_schemas_and_the_quick_start_event_is_valid():
    cfg = load_config(ROOT / "config" / "eventbroker.toml")
    assert Path(cfg.schemas.dir) == ROOT / "config" / "schemas"  # beside the file, whatever the cwd
    reg = load_registry(cfg, resolve_types(cfg))
    assert set(reg.types) == {"play", "search"}  # client_log stays free-form
    play = reg.get("play").resolve(0)
    assert play.validator.check_one(b'{"user": "ada", "track": 42}') is None  # README's quick start
    assert play.validator.check_one(b'{"user": "ada", "trak": 42}').rule == "additionalProperties"


def test_a_version_changed_in_place_is_refused_on_reload_and_a_removed_one_is_gone(tmp_path):
    conf = _config(tmp_path, [V1])
    cfg = load_config(conf)
    running = load_registry(cfg, resolve_types(cfg))
    changed = {**V1, "properties": {**V1["properties"], "track": {"type": "integer", "minimum": 0}}}
    (tmp_path / "schemas" / "play" / "1.json").write_text(json.dumps(changed))
    with pytest.raises(SchemaError, match=r"play v1 changed in place.*add v2 instead"):
        load_registry(cfg, resolve_types(cfg), running=running)
    (tmp_path / "schemas" / "play" / "1.json").write_text(json.dumps(V1, indent=2))  # the same, reformatted
    (tmp_path / "schemas" / "play" / "2.json").write_text(json.dumps(V1))
    again = load_registry(cfg, resolve_types(cfg), running=running)
    assert again.get("play").latest == 2
    assert again.stats is running.stats  # counters carry over
    (tmp_path / "schemas" / "play" / "2.json").unlink()  # removed (a reload rolled back): allowed
    back = load_registry(cfg, resolve_types(cfg), running=again)
    assert back.get("play").latest == 1 and back.get("play").resolve(2) is None  # -> unknown_schema_version
    changed_v2 = {**V1, "required": ["user"]}
    (tmp_path / "schemas" / "play" / "2.json").write_text(json.dumps(changed_v2))
    with pytest.raises(SchemaError, match=r"play v2 changed in place"):  # against the registry that had it
        load_registry(cfg, resolve_types(cfg), running=again)


def test_a_type_naming_a_missing_folder_fails_with_the_path(tmp_path):
    conf = tmp_path / "eventbroker.toml"
    conf.write_text('[types.play]\nschema = "nosuch"\n')
    cfg = load_config(conf)
    with pytest.raises(SchemaError, match=r"schemas/nosuch: no such schema folder"):
        load_registry(cfg, resolve_types(cfg))
    cfg = msgspec.structs.replace(cfg, schemas=SchemasConfig(dir=str(tmp_path / "elsewhere")))
    with pytest.raises(SchemaError, match="elsewhere/nosuch"):
        load_registry(cfg, resolve_types(cfg))


def test_schema_check_diff_and_test_commands(tmp_path, capsys, monkeypatch):
    v2 = {**V1, "properties": {**V1["properties"], "ms_played": {"type": "integer"}}}
    v3 = {**v2, "required": ["user", "track", "ms_played"]}
    conf = _config(tmp_path, [V1, v2])
    assert main(["schema", "check", "--config", str(conf)]) == 0
    assert "play: 2 versions (latest v2), backward" in capsys.readouterr().out
    (tmp_path / "schemas" / "play" / "3.json").write_text(json.dumps(v3))
    assert main(["schema", "check", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "play v3 field `ms_played` becomes required: not backward compatible with v2" in err
    assert main(["schema", "diff", "play", "1", "2", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "  adds optional field `ms_played` (breaks forward)" in out
    assert "backward: yes, forward: no" in out
    assert main(["schema", "diff", "play", "2", "3", "--config", str(conf)]) == 1
    assert "NOT compatible" in capsys.readouterr().out
    (tmp_path / "schemas" / "play" / "3.json").unlink()
    monkeypatch.setattr("sys.stdin", _Stdin(b'{"user":"a","track":1}\n\n{"user":"a","track":"x"}\n{"user"\n'))
    assert main(["schema", "test", "play", "--version", "1", "--config", str(conf)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["line 3: $.track: expected integer, got string (type)",
                                         "line 4: $: not valid JSON (json)"]
    assert "play v1: 1 of 3 valid" in captured.err


class _Stdin:
    def __init__(self, data: bytes) -> None:
        import io
        self.buffer = io.BytesIO(data)


def test_ack_details_travel_only_to_producers_that_asked():
    assert Hello.decode(Hello("c", flags=FLAG_REJECTION_DETAILS).encode()[12:]).flags == FLAG_REJECTION_DETAILS
    w = Welcome(1 << 20, 1 << 19, 100, 5000, "gw", flags=FLAG_REJECTION_DETAILS)
    assert Welcome.decode(w.encode()[12:]).flags == FLAG_REJECTION_DETAILS
    entry = AckEntry(0, Status.REJECTED, Reason.SCHEMA_VIOLATION, 2, 0, (3, 7), ("$.a: x", "é" * 300))
    plain = Ack(9, (entry,)).encode()
    detailed = Ack(9, (entry,)).encode(with_details=True)
    assert len(detailed) > len(plain)
    assert Ack.decode(plain[12:]).details == {}
    got = Ack.decode(detailed[12:])
    assert got.entries[0].indices == (3, 7)
    assert got.details[3] == "$.a: x"
    assert len(got.details[7].encode("utf-8", "replace")) <= 200  # cut to the limit


def _splitter_with(tmp_path: Path, versions: list[dict], **etype):
    import os

    from eventbroker import _fastpath as fp
    from eventbroker.config import EventType

    d = tmp_path / "sch" / "play"
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(versions, 1):
        (d / f"{i}.json").write_text(json.dumps(doc))
    from eventbroker.schema.model import read_versions
    from eventbroker.schema.registry import TypeSchemas

    et = EventType(name="play", topic="t", priority="normal", max_event_bytes=1 << 16, partitioning="key",
                   ring_bytes=1 << 22, enabled=True, schema="play", **etype)
    ring = fp.TypeRing("play", capacity_bytes=1 << 22, max_event_bytes=1 << 16)
    ring.schemas = TypeSchemas(et, read_versions(tmp_path / "sch", "play"), {})
    sp = fp.BatchSplitter(max_events_per_batch=10_000, max_event_bytes=1 << 16)
    sp.add(ring)

    def ingest(events: list[tuple[bytes, bytes]]):
        enc = fp.BatchEncoder()
        for name, payload in events:
            enc.add(name, os.urandom(16), 1, None, payload)
        r = fp.FrameReader(1 << 22)
        r.feed(enc.finish(1))
        r.next_frame()
        return sp.ingest_answering(r, 10)

    return ring, ingest


def test_review_findings_hostile_payloads_cost_only_their_own_events(tmp_path):
    """Deep nesting, a field name that forges msgspec's error path, and
    dashes in a uuid: each refused alone, the valid events beside them kept."""
    closed = {**V1, "properties": {**V1["properties"], "id": {"type": "string", "format": "uuid"}}}
    ring, ingest = _splitter_with(tmp_path, [closed])
    forged = b'{"user":"x","track":1,"a` - at `$[2]":1}'
    events = [(b"play", b"[" * 5000 + b"]" * 5000), (b"play", forged), (b"play", b'{"user":"x","track":"no"}'),
              (b"play", b'{"user":"x","track":1}'), (b"play", b'{"user":"x","track":1,"id":"' + b"-" * 36 + b'"}')]
    _, _, results, *_ = ingest(events)
    rejected = next(r for r in results if r[2] == Reason.SCHEMA_VIOLATION)
    assert rejected[4] == [0, 1, 2, 4]  # the valid one (3) is the only one kept
    assert ring.pending_events == 1


def test_a_batch_naming_a_type_and_one_of_its_versions_keeps_each_part_together(tmp_path):
    """`play` and `play@1` in one batch, interleaved: the ring holds each
    part's events together, in the order the parts were accepted (a lane
    attributes its units to parts in that order)."""
    ring, ingest = _splitter_with(tmp_path, [V1])
    events = [(b"play" if i % 2 else b"play@1", b'{"user":"u","track":%d}' % i) for i in range(6)]
    _, names, results, *_ = ingest(events)
    accepted = [r for r in results if r[1] == 255]
    assert [r[0] for r in accepted] == [0, 1] and names == [b"play", b"play"]
    unit = ring.build_unit(1 << 20, 1, 0)
    import struct
    batch = unit[0][0][1]
    # records in the batch: their payloads' track numbers, in ring order
    tracks = [int(x) for x in __import__("re").findall(rb'"track":(\d+)', batch)]
    assert tracks == [0, 2, 4, 1, 3, 5]
    assert struct.unpack(">i", batch[57:61])[0] == 6
