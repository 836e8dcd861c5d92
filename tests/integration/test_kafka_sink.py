"""The Kafka sink against a real Kafka-protocol broker."""

from __future__ import annotations

import struct

import pytest

from conftest import read_topic, unique_prefix
from eventbroker import _fastpath as fp
from eventbroker.config import EventType, KafkaConfig
from eventbroker.kafka.errors import ProduceFailed
from eventbroker.kafka.sink import KafkaSink


def _unit(events: list[tuple[bytes | None, bytes]], n_partitions: int, sticky: int = 0):
    ring = fp.TypeRing("t", capacity_bytes=1 << 24, max_event_bytes=1 << 20)
    router = fp.BatchSplitter(max_events_per_batch=100_000, max_event_bytes=1 << 20)
    router.add(ring)
    enc = fp.BatchEncoder()
    for i, (key, value) in enumerate(events):
        enc.add(b"t", struct.pack(">QQ", 9, i + 1), 1_700_000_000_000 + i, key, value)
    reader = fp.FrameReader(1 << 24)
    reader.feed(enc.finish(1))
    assert reader.next_frame() == fp.FRAME_EVENT_BATCH
    router.ingest(reader, 1)
    batches, n, _, _, _ = ring.build_unit(1 << 30, n_partitions, sticky)
    assert n == len(events)
    return batches


def _etype(topic: str) -> EventType:
    return EventType(name="t", topic=topic, priority="normal", max_event_bytes=1 << 20, partitioning="key",
                     ring_bytes=1 << 26, enabled=True)


async def test_sink_delivers_prebuilt_batches(kafka_bootstrap):
    topic = f"{unique_prefix()}.sink"
    sink = KafkaSink(KafkaConfig(topic_partitions=3), kafka_bootstrap)
    await sink.start({"t": _etype(topic)})
    try:
        n_parts = await sink.partitions(topic)
        assert n_parts == 3
        events = [(b"k%d" % i, b"v%d" % i) for i in range(300)]
        batches = _unit(events, n_parts)
        assert len(batches) > 1  # keys spread over partitions
        await sink.send(topic, batches)
        assert batches == []  # everything acknowledged
    finally:
        await sink.stop()
    got = read_topic(kafka_bootstrap, topic, 300)
    assert sorted(m.value() for m in got) == sorted(v for _, v in events)
    for m in got:
        assert m.partition() == (fp.murmur2(m.key()) & 0x7FFFFFFF) % 3


async def test_partial_failure_keeps_only_the_failed_partitions(kafka_bootstrap):
    """A partition without a leader fails; the others are acknowledged and
    removed, so a retry resends only what failed (no duplicates)."""
    topic = f"{unique_prefix()}.partial"
    sink = KafkaSink(KafkaConfig(topic_partitions=2), kafka_bootstrap)
    await sink.start({"t": _etype(topic)})
    try:
        assert await sink.partitions(topic) == 2
        good = _unit([(None, b"good")], 2, sticky=1)
        bad = [(5, good[0][1], 1)]  # partition 5 does not exist
        batches = good + bad
        with pytest.raises(ProduceFailed) as ei:
            await sink.send(topic, batches)
        assert batches == bad
        assert 5 in ei.value.errors
    finally:
        await sink.stop()
    assert [m.value() for m in read_topic(kafka_bootstrap, topic, 1)] == [b"good"]
