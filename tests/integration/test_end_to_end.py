"""Producer SDK -> daemon -> real Kafka-protocol broker -> independent consumer.

Each test runs a daemon in the test's event loop (uvloop and asyncio), sends
through the SDK over loopback TCP, and reads the topics back with librdkafka.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from conftest import daemon_address, read_topic, record_headers
from eventbroker import _fastpath as fp
from eventbroker.client import EventRejected, Producer, SyncProducer


def _by_id(records) -> dict[bytes, object]:
    return {record_headers(m)["eb.id"]: m for m in records}


async def test_each_type_lands_in_its_own_topic(daemon_factory, kafka_bootstrap):
    """Count, payloads, keys, ids, headers and timestamps arrive unchanged, per type."""
    sent: dict[str, dict[bytes, tuple[bytes, bytes | None, int]]] = {"play": {}, "search": {}, "client_log": {}}
    t0 = int(time.time() * 1000)
    async with daemon_factory() as d, Producer(daemon_address(d), linger_ms=2) as p:
        futs = []
        for i in range(3000):
            t = ("play", "search", "client_log")[i % 3]
            payload = b'{"i":%d,"t":"%s"}' % (i, t.encode())
            key = b"user-%d" % (i % 17) if t != "client_log" else None
            ts = 1_700_000_000_000 + i
            fut = await p.send(t, payload, key=key, timestamp_ms=ts)
            futs.append((t, payload, key, ts, fut))
        await p.flush()
        for t, payload, key, ts, fut in futs:
            eid = fut.result()
            assert len(eid) == 16
            sent[t][eid] = (payload, key, ts)
        topics = {t: lane.etype.topic for t, lane in d.router.lanes.items()}
    t1 = int(time.time() * 1000)
    for t, expected in sent.items():
        got = read_topic(kafka_bootstrap, topics[t], len(expected))
        assert len(got) == len(expected), f"{t}: {len(got)} records for {len(expected)} events"
        by_id = _by_id(got)
        assert set(by_id) == set(expected), f"{t}: ids differ"
        for eid, (payload, key, ts) in expected.items():
            m = by_id[eid]
            h = record_headers(m)
            assert m.value() == payload
            assert m.key() == key
            assert m.timestamp()[1] == ts
            assert h["eb.type"] == t.encode()
            assert struct.unpack(">q", h["eb.ts"])[0] == ts
            assert t0 <= struct.unpack(">q", h["eb.recv_ts"])[0] <= t1  # the gateway's clock


async def test_keyed_events_follow_kafkas_default_partitioner(daemon_factory, kafka_bootstrap):
    """A keyed type puts each key where murmur2 (Kafka's default) would."""
    async with daemon_factory({"play": {"partitioning": "key"}}) as d, Producer(daemon_address(d)) as p:
        futs = [await p.send("play", b"x%d" % i, key=b"k%d" % i) for i in range(200)]
        await p.flush()
        assert all(f.result() for f in futs)
        topic = d.router.lanes["play"].etype.topic
        n_parts = await d.sink.partitions(topic)
    got = read_topic(kafka_bootstrap, topic, 200)
    assert len(got) == 200
    for m in got:
        assert m.partition() == (fp.murmur2(m.key()) & 0x7FFFFFFF) % n_parts


async def test_partial_ack_for_mixed_batch(daemon_factory, kafka_bootstrap):
    """Unknown, disabled, oversize and invalid events are rejected with their
    reason; the valid events of the same batch are persisted."""
    types = {"play": {"max_event_bytes": 100}, "search": {}, "retired": {"enabled": False}}
    async with daemon_factory(types) as d, Producer(daemon_address(d), linger_ms=50) as p:
        ok_play = await p.send("play", b"small")
        big_play = await p.send("play", b"x" * 101)
        ok_search = await p.send("search", b"query")
        unknown = await p.send("nosuch", b"?")
        disabled = await p.send("retired", b"old")
        empty = await p.send("search", b"")
        await p.flush()
        assert ok_play.result() and ok_search.result()
        reasons = {}
        for name, f in [("big", big_play), ("unknown", unknown), ("disabled", disabled), ("empty", empty)]:
            exc = f.exception()
            assert isinstance(exc, EventRejected), name
            reasons[name] = exc.reason
        assert reasons == {"big": "too_large", "unknown": "unknown_type", "disabled": "disabled", "empty": "invalid"}
        assert p.stats["persisted"] == 2 and p.stats["rejected"] == 4
        topics = {t: lane.etype.topic for t, lane in d.router.lanes.items()}
    assert [m.value() for m in read_topic(kafka_bootstrap, topics["play"], 1)] == [b"small"]
    assert [m.value() for m in read_topic(kafka_bootstrap, topics["search"], 1)] == [b"query"]


async def test_oversize_event_over_global_limit_is_rejected_by_sdk(daemon_factory):
    """An event over the server's max_event_bytes fails fast with too_large."""
    async with daemon_factory(server={"max_event_bytes": 1000}) as d, Producer(daemon_address(d)) as p:
        await p.send_and_wait("play", b"fine")  # handshake done, limits known
        with pytest.raises(EventRejected) as ei:
            await p.send_and_wait("play", b"y" * 1001)
        assert ei.value.reason == "too_large"


async def test_full_ring_answers_retry_later_and_sdk_resends(daemon_factory, kafka_bootstrap):
    """With a tiny ring and many events at once, parts get retry-later; the SDK
    sends them again and every event ends up persisted exactly once."""
    types = {"play": {"ring_bytes": 2 * 1024 * 1024}}
    async with daemon_factory(types, server={"max_frame_bytes": 1024 * 1024}) as d:
        async with Producer(daemon_address(d), linger_ms=0, batch_max_bytes=512 * 1024, max_inflight_batches=64) as p:
            futs = [await p.send("play", b"z" * 900) for _ in range(20_000)]
            await p.flush()
            assert all(f.result() for f in futs)
            retried = p.stats["retried"]
        topic = d.router.lanes["play"].etype.topic
    got = read_topic(kafka_bootstrap, topic, 20_000)
    assert len(_by_id(got)) == 20_000
    assert len(got) == 20_000
    # The ring is far smaller than the 18 MB sent at once, so back-pressure must have happened.
    assert retried > 0


async def test_sync_producer(daemon_factory, kafka_bootstrap):
    """The blocking SDK delivers and reports rejections through its futures."""
    async with daemon_factory() as d:
        addr = daemon_address(d)
        topic = d.router.lanes["search"].etype.topic

        def run() -> tuple[list[bytes], BaseException | None]:
            with SyncProducer(addr) as sp:
                ids = [sp.send("search", b"q%d" % i).result(timeout=30) for i in range(49)]
                ids.append(sp.send_and_wait("search", b"last", timeout_s=30))
                bad = sp.send("nosuch", b"?").exception(timeout=30)
            return ids, bad

        ids, bad = await asyncio.get_running_loop().run_in_executor(None, run)
    assert len(set(ids)) == 50
    assert isinstance(bad, EventRejected) and bad.reason == "unknown_type"
    got = read_topic(kafka_bootstrap, topic, 50)
    assert {record_headers(m)["eb.id"] for m in got} == set(ids)


async def test_many_connections_share_the_daemon(daemon_factory, kafka_bootstrap):
    """Fifty producers at once: every event of every producer persisted once."""
    async with daemon_factory() as d:
        addr = daemon_address(d)

        async def one(n: int) -> list[bytes]:
            async with Producer(addr, client_id=f"p{n}") as p:
                futs = [await p.send("search", b"%d-%d" % (n, i)) for i in range(100)]
                await p.flush()
                return [f.result() for f in futs]

        results = await asyncio.gather(*(one(n) for n in range(50)))
        topic = d.router.lanes["search"].etype.topic
        assert d.server.stats.connections_total >= 50
    ids = {eid for r in results for eid in r}
    assert len(ids) == 5000
    got = read_topic(kafka_bootstrap, topic, 5000)
    assert len(got) == 5000 and {record_headers(m)["eb.id"] for m in got} == ids
