"""Compressed record batches into a real broker, read back by two independent
consumers (librdkafka through confluent-kafka, and aiokafka), for every codec."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from conftest import daemon_address, read_topic, record_headers
from eventbroker.client import Producer

CODECS = ["zstd", "lz4", "gzip", "snappy", "none"]


def _payload(i: int) -> bytes:
    return (b'{"user":"u%08d","track":%d,"context":"%s","offline":false,"country":"SE"}'
            % (i % 977, i * 31 % 100_003, (b"album", b"radio", b"search")[i % 3]))


async def _read_with_aiokafka(bootstrap: str, topic: str, expected: int) -> list:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, check_crcs=True)
    await c.start()
    try:
        parts = c.partitions_for_topic(topic) or set()
        for _ in range(50):
            if parts:
                break
            await asyncio.sleep(0.1)
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        out = []
        idle = 0
        while idle < 10 or len(out) < expected:
            got = await c.getmany(timeout_ms=200, max_records=10_000)
            n = sum(len(v) for v in got.values())
            idle = 0 if n else idle + 1
            if idle > 100:
                break
            for records in got.values():
                out.extend(records)
        return out
    finally:
        await c.stop()


@pytest.mark.parametrize("codec", CODECS)
async def test_every_codec_is_read_back_by_two_clients(daemon_factory, kafka_bootstrap, codec):
    n = 3000
    async with daemon_factory({"play": {"compression": codec}}) as d, Producer(daemon_address(d)) as p:
        sent = {}
        for i in range(n):
            key = b"user-%d" % (i % 50) if i % 4 else None
            fut = await p.send("play", _payload(i), key=key)
            sent[i] = (fut, key)
        report = await p.flush(60)  # a codec the broker refused would leave them retrying
        assert report.persisted == n and report.rejected == 0
        expected = {f.result(): (_payload(i), key) for i, (f, key) in sent.items()}
        topic = d.router.lanes["play"].etype.topic
        snap = d.router.lanes["play"].snapshot()
    assert snap.batch_bytes > 0
    if codec == "none":
        assert snap.compressed_bytes == snap.batch_bytes
    else:  # JSON this repetitive shrinks to well under half with any codec
        assert snap.compressed_bytes < snap.batch_bytes / 2, (codec, snap)

    got = read_topic(kafka_bootstrap, topic, n)
    assert len(got) == n
    by_id = {record_headers(m)["eb.id"]: (m.value(), m.key()) for m in got}
    assert by_id == expected

    records = await _read_with_aiokafka(kafka_bootstrap, topic, n)
    assert len(records) == n
    by_id = {dict(r.headers)["eb.id"]: (r.value, r.key) for r in records}
    assert by_id == expected
