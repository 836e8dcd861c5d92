"""The SDK's native send path through a real gateway and broker: produce()
with counts, per-event callbacks, batch reports, rejections, retry-later,
back-pressure, close, and the blocking SyncProducer from several threads
(on both event loops)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import daemon_address, read_topic, record_headers
from eventbroker.client import BatchReport, BufferFull, EventRejected, Producer, ProducerClosed, SyncProducer


def _ids(prefix: bytes, n: int) -> set[bytes]:
    return {prefix + i.to_bytes(8, "big") for i in range(1, n + 1)}


async def test_produce_counts_reports_and_callbacks(daemon_factory, kafka_bootstrap):
    """produce() without callbacks is counted by flush(); on_delivery answers
    the events that asked; on_report sums to the same; unknown types are
    rejected with their reason in every form."""
    reports: list[BatchReport] = []
    delivered: dict[bytes, object] = {}
    async with daemon_factory({"play": {}}) as d, Producer(daemon_address(d), on_report=reports.append) as p:
        for i in range(5000):
            p.produce("play", b'{"i":%d}' % i, key=b"u%d" % (i % 13))
        p.produce("nosuch", b"?")
        p.produce("play", b"watched", on_delivery=lambda eid, exc: delivered.__setitem__(eid, exc))
        p.produce("nosuch", b"??", on_delivery=lambda eid, exc: delivered.__setitem__(eid, exc))
        report = await p.flush(30)
        assert (report.persisted, report.rejected, report.failed) == (5001, 2, 0)
        assert [r.reason for r in report.rejections] == ["unknown_type"] * 2
        assert {r.event_type for r in report.rejections} == {"nosuch"}
        assert sum(r.persisted for r in reports) == 5001 and sum(len(r.rejected) for r in reports) == 2
        assert (await p.flush()).persisted == 0  # counted once
        stats = p.stats
        prefix = p.id_prefix
        topic = d.router.lanes["play"].etype.topic
    assert stats["sent"] == 5003 and stats["persisted"] == 5001 and stats["rejected"] == 2 and stats["buffered"] == 0
    assert len(delivered) == 2
    watched = prefix + (5002).to_bytes(8, "big")
    assert delivered[watched] is None
    bad = delivered[prefix + (5003).to_bytes(8, "big")]
    assert isinstance(bad, EventRejected) and bad.reason == "unknown_type"
    got = read_topic(kafka_bootstrap, topic, 5001)
    by_id = {record_headers(m)["eb.id"]: m for m in got}
    assert set(by_id) == _ids(prefix, 5002) - {prefix + (5001).to_bytes(8, "big")}
    assert by_id[watched].value() == b"watched"
    assert by_id[prefix + (14).to_bytes(8, "big")].key() == b"u0"


async def test_produce_retry_later_is_resent_from_the_frames(daemon_factory, kafka_bootstrap):
    """A tiny ring answers retry-later; produced events (no futures) are sent
    again from the frames they went out in, each persisted exactly once."""
    types = {"play": {"ring_bytes": 2 * 1024 * 1024}}
    async with daemon_factory(types, server={"max_frame_bytes": 1024 * 1024}) as d:
        async with Producer(daemon_address(d), linger_ms=0, batch_max_bytes=512 * 1024,
                            max_inflight_batches=64) as p:
            for i in range(20_000):
                p.produce("play", b"%06d" % i + b"z" * 894)
            report = await p.flush(60)
            retried = p.stats["retried"]
            prefix = p.id_prefix
        topic = d.router.lanes["play"].etype.topic
    assert report.persisted == 20_000 and retried > 0
    got = read_topic(kafka_bootstrap, topic, 20_000)
    assert len(got) == 20_000
    assert {record_headers(m)["eb.id"] for m in got} == _ids(prefix, 20_000)


async def test_a_full_buffer_raises_and_send_waits(daemon_factory):
    async with daemon_factory({"play": {}}) as d, Producer(daemon_address(d), max_buffered_events=100) as p:
        await p.wait_connected(10)
        for _ in range(100):
            p.produce("play", b"x")
        with pytest.raises(BufferFull):
            p.produce("play", b"x")
        assert p.stats["sent"] == 100
        fut = await p.send("play", b"waited")  # waits for space instead
        await p.wait_for_space()
        p.produce("play", b"after")
        assert len(await fut) == 16
        assert (await p.flush(30)).persisted == 102


async def test_close_fails_what_was_never_answered(tmp_path):
    """Nothing listens: close() answers every event ProducerClosed, through
    callbacks, futures and the counts; produce() after close raises."""
    from eventbroker.kafka.embedded import free_port

    answers: list[object] = []
    p = Producer(f"127.0.0.1:{free_port()}", reconnect_backoff_ms=(10, 50))
    await p.start()
    for i in range(10):
        p.produce("play", b"%d" % i, on_delivery=lambda eid, exc: answers.append(exc))
    fut = await p.send("play", b"f")
    await p.close(timeout_s=0.3)
    assert len(answers) == 10 and all(isinstance(a, ProducerClosed) for a in answers)
    assert isinstance(fut.exception(), ProducerClosed)
    assert p.stats["failed"] == 11 and p.stats["buffered"] == 0
    with pytest.raises(ProducerClosed):
        p.produce("play", b"late")


async def test_sync_producer_produce_from_several_threads(daemon_factory, kafka_bootstrap):
    """Four threads produce into one SyncProducer at once (the native batch
    is shared under the GIL); every event lands exactly once."""
    async with daemon_factory({"play": {}}) as d:
        addr = daemon_address(d)
        topic = d.router.lanes["play"].etype.topic

        def run():
            with SyncProducer(addr, linger_ms=1, max_buffered_events=5000) as sp:
                def worker(t: int) -> None:
                    for i in range(5000):
                        while True:
                            try:
                                sp.produce("play", b"%d-%d" % (t, i), key=b"t%d" % t)
                                break
                            except BufferFull:
                                threading.Event().wait(0.001)
                threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                eid = sp.send_and_wait("play", b"last", timeout_s=30)
                report = sp.flush(30)
                return report, sp.id_prefix, eid, sp.stats

        report, prefix, last, stats = await asyncio.get_running_loop().run_in_executor(None, run)
    assert report.persisted == 20_001 and report.rejected == 0
    assert stats["sent"] == 20_001 and last == prefix + (20_001).to_bytes(8, "big")
    got = read_topic(kafka_bootstrap, topic, 20_001)
    assert len(got) == 20_001
    assert {record_headers(m)["eb.id"] for m in got} == _ids(prefix, 20_001)
    assert {m.value() for m in got} == {b"%d-%d" % (t, i) for t in range(4) for i in range(5000)} | {b"last"}
