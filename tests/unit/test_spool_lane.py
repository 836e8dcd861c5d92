"""The spool lane and forwarder against fake sinks (exact failure timing)."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

from conftest import MiB, make_config, open_spool
from eventbroker import _fastpath as fp
from eventbroker.kafka.sink import BuildsRecordBatches
from eventbroker.spool import log as sp
from eventbroker.spool.lane import SpoolLanes


def _tagged_entry(tag: bytes) -> bytes:
    tail = b"TAG" + tag
    return struct.pack(">IIIIQ", len(tail), 0, 0, 0, 0) + tail


class _FlakySink(BuildsRecordBatches):
    """Records what arrives in order; fails the first send of one record."""

    def __init__(self, fail_tag: bytes, error: Exception, times: int = 1) -> None:
        self.arrived: list[bytes] = []
        self.fail_tag, self.error, self.times = fail_tag, error, times

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches) -> None:
        data = batches[0][1]
        i = data.find(b"TAG")
        tag = data[i + 3 : i + 6]
        if tag == self.fail_tag and self.times:
            self.times -= 1
            await asyncio.sleep(0.05)
            raise self.error
        await asyncio.sleep(0.001)
        self.arrived.append(tag)


def _forward(tmp_path: Path, sink, n: int = 6):
    from eventbroker.config import EventType, KafkaConfig
    from eventbroker.spool.forwarder import Forwarder

    async def go():
        log = open_spool(tmp_path, fsync="never")
        for i in range(n):
            log.append([sp.encode_record(1, _tagged_entry(b"%03d" % i))])
        et = EventType(name="t", topic="t", priority="normal", max_event_bytes=MiB, partitioning="spread",
                       ring_bytes=MiB, enabled=True, ack="spool")
        f = Forwarder(log, et, sink, KafkaConfig(retry_backoff_ms=10, max_inflight_batches_per_type=4))
        f.start()
        await f.stop(time.monotonic() + 5)
        log.close()
        return f

    return asyncio.run(go())


def test_forwarder_keeps_log_order_through_a_failed_send(tmp_path):
    sink = _FlakySink(b"000", RuntimeError("broker gone"))
    f = _forward(tmp_path, sink)
    assert sink.arrived == [b"%03d" % i for i in range(6)]
    assert f.stats.send_failures == 1 and f.stats.events_forwarded == 6
    assert sp.read_checkpoint(tmp_path) == f.delivered and f.backlog_bytes == 0


def test_a_record_kafka_refuses_for_good_goes_to_dead_letter(tmp_path):
    """MESSAGE_TOO_LARGE for one record: it is kept in dead-letter/ in the
    spool's record format, and the records behind it are delivered."""
    from eventbroker.kafka.errors import ProduceFailed

    sink = _FlakySink(b"002", ProduceFailed("t", {0: "too large"}, {0: 10}), times=99)
    f = _forward(tmp_path, sink)
    assert sink.arrived == [b"000", b"001", b"003", b"004", b"005"]
    assert f.stats.dead_lettered_events == 1 and f.stats.events_forwarded == 5
    dead = list((tmp_path / "dead-letter").glob("*.rec"))
    assert len(dead) == 1
    n, entries, end = sp.parse_record(dead[0].read_bytes(), 0)
    assert n == 1 and bytes(entries) == _tagged_entry(b"002")
    assert sp.check_directory(tmp_path)["dead_letter_records"] == 1


def test_a_hung_spool_write_hands_events_back_as_spool_unavailable(tmp_path):
    """A write stuck longer than stall_timeout_ms: the type's producers are
    answered retry-later spool_unavailable, not kafka_unavailable."""
    from eventbroker.config import KafkaConfig, ServerConfig, SpoolConfig
    from eventbroker.gateway.router import Router
    from eventbroker.kafka.sink import NullSink
    from eventbroker.protocol import Reason

    answers: list[tuple[str, int]] = []

    class Target:
        closed = False

        def part_persisted(self, seq, ti, count):
            answers.append(("persisted", 0))

        def part_retry(self, seq, ti, count, reason, retry_ms):
            answers.append(("retry", reason))

    async def go():

        cfg = make_config("unused:1", {"audit": {"ack": "spool"}})
        from eventbroker.config import resolve_types

        router = Router(resolve_types(cfg), NullSink(), KafkaConfig(stall_timeout_ms=200), ServerConfig(),
                        SpoolLanes(SpoolConfig(dir=str(tmp_path))))
        lane = router.lanes["audit"]
        real_append = lane.spool.append

        def slow_append(*a):
            time.sleep(0.8)
            return real_append(*a)

        lane.spool.append = slow_append
        router.start()
        import test_fastpath as tf

        enc = fp.BatchEncoder()
        enc.add(b"audit", b"i" * 16, 1, None, b"payload")
        _, answers, accepted, _, _ = router.ingest(tf.reader_on(enc.finish(1)), 2, None, Target())
        assert (answers, accepted) == ([], 1)
        await asyncio.sleep(1.2)
        await router.stop(time.monotonic() + 1)
        return lane

    lane = asyncio.run(go())
    assert answers == [("retry", Reason.SPOOL_UNAVAILABLE)]
    assert lane.stats.sheds == 1
