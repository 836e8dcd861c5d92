"""Schemas at the edge, through real sockets and the real broker: the SDK and
``eventbroker produce`` against a daemon whose types have schemas, read back
from Kafka with librdkafka."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from conftest import daemon_address, metrics, read_topic, record_headers, total
from eventbroker.cli.status import render, scrape
from eventbroker.client import EventRejected, Producer
from eventbroker.config import SchemasConfig

PLAY_V1 = {
    "type": "object",
    "properties": {"user": {"type": "string", "minLength": 1}, "track": {"type": "integer", "minimum": 0}},
    "required": ["user", "track"],
    "additionalProperties": False,
}
# v2 adds an optional field: backward compatible (the table grows a column).
PLAY_V2 = {**PLAY_V1, "properties": {**PLAY_V1["properties"], "ms_played": {"type": "integer"}}}


def write_schemas(root, versions: dict[str, list[dict]]):
    for name, docs in versions.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, doc in enumerate(docs, 1):
            (root / name / f"{i}.json").write_text(json.dumps(doc))
    return SchemasConfig(dir=str(root))


def _types(**play) -> dict[str, dict]:
    return {"play": {"schema": "play", **play}, "client_log": {}}


async def test_valid_events_reach_kafka_with_their_version_and_invalid_ones_are_rejected_with_the_path(
        daemon_factory, kafka_bootstrap, tmp_path):
    schemas = write_schemas(tmp_path / "schemas", {"play": [PLAY_V1, PLAY_V2]})
    async with daemon_factory(_types(), schemas=schemas) as d, Producer(daemon_address(d), linger_ms=5) as p:
        good = [await p.send("play", b'{"user":"ada","track":%d}' % i) for i in range(50)]
        v1 = await p.send("play", b'{"user":"ada","track":1}', schema_version=1)
        with_new_field = await p.send("play", b'{"user":"ada","track":2,"ms_played":3000}')
        typo = await p.send("play", b'{"user":"ada","trak":42}')
        wrong_type = await p.send("play", b'{"user":"ada","track":"42"}')
        not_json = await p.send("play", b'{"user":"ada","track":')
        old_version_new_field = await p.send("play", b'{"user":"ada","track":2,"ms_played":1}', schema_version=1)
        no_such_version = await p.send("play", b'{"user":"ada","track":2}', schema_version=9)
        free_form = await p.send("client_log", b"not json at all: client_log has no schema")
        await p.flush()
        topic = d.router.lanes["play"].etype.topic
        m = await metrics(d.admin.address)
        snap = await asyncio.to_thread(scrape, d.admin.address)
    row = next(line for line in render(snap, snap).splitlines() if line.startswith("play "))
    assert row.split()[-1] == f"{100 * 4 / 56:.1f}%"  # `eventbroker status`: 4 invalid of 56 checked
    ids = {f.result() for f in [*good, v1, with_new_field]}
    assert free_form.result()
    details = {}
    for name, fut in (("typo", typo), ("wrong_type", wrong_type), ("not_json", not_json),
                      ("old_version_new_field", old_version_new_field)):
        exc = fut.exception()
        assert isinstance(exc, EventRejected) and exc.reason == "schema_violation", (name, exc)
        details[name] = exc.detail
    assert details["typo"] == "$: undeclared field `trak` (additionalProperties is false)"
    assert details["wrong_type"] == "$.track: expected integer, got string"
    assert details["not_json"] == "$: not valid JSON"
    assert "ms_played" in details["old_version_new_field"]
    assert isinstance(no_such_version.exception(), EventRejected)
    assert no_such_version.exception().reason == "unknown_schema_version"
    got = read_topic(kafka_bootstrap, topic, len(ids))
    by_id = {record_headers(r)["eb.id"]: r for r in got}
    assert set(by_id) == ids  # nothing invalid in the topic, nothing valid missing
    assert record_headers(by_id[v1.result()])["eb.schema"] == b"1"
    assert record_headers(by_id[good[0].result()])["eb.schema"] == b"2"  # the latest by default
    assert total(m, "eventbroker_schema_events_validated_total", type="play", version="2") == 51
    assert total(m, "eventbroker_schema_events_validated_total", type="play", version="1") == 1
    assert total(m, "eventbroker_schema_events_invalid_total", type="play", rule="additionalProperties") == 2
    assert total(m, "eventbroker_schema_events_invalid_total", type="play", rule="type") == 1
    assert total(m, "eventbroker_schema_events_invalid_total", type="play", rule="json") == 1
    assert total(m, "eventbroker_events_rejected_total", type="play", reason="schema_violation") == 4


async def test_a_mixed_batch_is_answered_per_event(daemon_factory, kafka_bootstrap, tmp_path):
    """One batch, every other event invalid: each answered on its own, in any position."""
    schemas = write_schemas(tmp_path / "schemas", {"play": [PLAY_V1]})
    async with daemon_factory(_types(), schemas=schemas) as d, Producer(daemon_address(d), linger_ms=50) as p:
        futs = []
        for i in range(400):
            payload = b'{"user":"u%d","track":%d}' % (i, i) if i % 2 else b'{"user":"","track":%d}' % i
            futs.append(await p.send("play", payload))
        await p.flush()
        topic = d.router.lanes["play"].etype.topic
        assert d.server.stats.batches < 50  # they really went in few batches
    for i, f in enumerate(futs):
        if i % 2:
            assert f.exception() is None
        else:
            assert isinstance(f.exception(), EventRejected)
            assert f.exception().detail == "$.user: shorter than minLength 1"
    assert len(read_topic(kafka_bootstrap, topic, 200)) == 200


@pytest.mark.parametrize("ack", ["kafka", "spool"])
async def test_dead_letter_mode_acks_invalid_events_into_the_dead_letter_topic_with_the_reason(
        daemon_factory, kafka_bootstrap, tmp_path, ack):
    """Also for a type acknowledged from the disk spool: the dead-letter
    entries travel through the spool and its forwarder."""
    schemas = write_schemas(tmp_path / "schemas", {"play": [PLAY_V1]})
    prefix = "dl" + os.urandom(4).hex()
    types = _types(on_invalid="dead_letter", dead_letter_topic=f"{prefix}.play.invalid", ack=ack)
    async with daemon_factory(types, prefix=prefix, schemas=schemas, spool={"dir": str(tmp_path / "spool")}) as d, \
            Producer(daemon_address(d), linger_ms=5) as p:
        good = [await p.send("play", b'{"user":"ada","track":%d}' % i, key=b"ada") for i in range(20)]
        bad = [await p.send("play", b'{"user":"ada","track":-%d}' % (i + 1), key=b"ada") for i in range(5)]
        await p.flush()
        topic = d.router.lanes["play"].etype.topic
    for f in good + bad:
        assert f.exception() is None  # acknowledged: they are in one of the two topics
    main = read_topic(kafka_bootstrap, topic, 20)
    assert {record_headers(r)["eb.id"] for r in main} == {f.result() for f in good}
    dead = read_topic(kafka_bootstrap, f"{prefix}.play.invalid", 5)
    assert {record_headers(r)["eb.id"] for r in dead} == {f.result() for f in bad}
    for r in dead:
        h = record_headers(r)
        assert h["eb.error"] == b"$.track: must be >= 0"
        assert h["eb.schema"] == b"1" and h["eb.type"] == b"play"
        assert r.key() == b"ada" and r.value().startswith(b'{"user":"ada","track":-')


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_produce_prints_each_rejected_line_with_its_path(daemon_factory, tmp_path):
    schemas = write_schemas(tmp_path / "schemas", {"play": [PLAY_V1]})
    lines = b'{"user":"ada","track":42}\n{"user":"ada","trak":42}\n{"user":"bob","track":7}\n{"track":1}\n'
    async with daemon_factory(_types(), schemas=schemas) as d:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventbroker.cli", "produce", "--type", "play", "--server", daemon_address(d),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(lines), 60)
    assert proc.returncode == 1, err
    assert b"line 2: rejected schema_violation: $: undeclared field `trak` (additionalProperties is false)" in err
    assert b"line 4: rejected schema_violation: $: missing required field `user`" in err
    assert out.strip() == b"play: sent 4, persisted 2, rejected 2 schema_violation"
