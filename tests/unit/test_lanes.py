"""Lanes against fake sinks (exact failure timing): shedding, probing, priorities."""

from __future__ import annotations

import asyncio
import struct
import time

from conftest import make_config
from eventbroker import _fastpath as fp
from eventbroker.config import resolve_types
from eventbroker.gateway.lane import LaneState
from eventbroker.gateway.router import Router
from eventbroker.kafka.sink import BuildsRecordBatches
from eventbroker.protocol import Reason, Status


class _Target:
    closed = False

    def __init__(self) -> None:
        self.answers: list[tuple] = []

    def part_persisted(self, batch_seq, type_index, count):
        self.answers.append((batch_seq, type_index, Status.PERSISTED, count))

    def part_retry(self, batch_seq, type_index, count, reason, retry_after_ms):
        self.answers.append((batch_seq, type_index, Status.RETRY_LATER, count, reason, retry_after_ms))


class _HangingSink(BuildsRecordBatches):
    """Acknowledges every topic except one, whose requests never return."""

    def __init__(self, hanging_topic: str) -> None:
        self.hanging_topic = hanging_topic
        self.sent: dict[str, int] = {}

    async def partitions(self, topic: str) -> int:
        return 2

    async def send(self, topic, batches):
        if topic == self.hanging_topic:
            await asyncio.Event().wait()
        self.sent[topic] = self.sent.get(topic, 0) + sum(c for _, _, c in batches)
        batches.clear()


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _ingest(router: Router, target: _Target, seq: int, types: list[bytes], n: int, size: int = 50) -> None:
    enc = fp.BatchEncoder()
    for i in range(n):
        for t in types:
            enc.add(t, struct.pack(">QQ", seq, i + 1), 1, None, b"x" * size)
    reader = fp.FrameReader(1 << 24)
    reader.feed(enc.finish(seq))
    reader.next_frame()
    _, answers, accepted, _, _ = router.ingest(reader, 1, None, target)
    assert answers == [] and accepted == len(types)


async def test_hung_type_is_shed_after_stall_timeout():
    """A type whose produce never returns is answered retry-later after
    stall_timeout_ms and then refused at once; the healthy type keeps going."""
    cfg = make_config("unused:1", {"fast": {}, "hung": {}},
                      kafka={"stall_timeout_ms": 300, "linger_ms": 0, "retry_backoff_ms": 10_000})
    types = resolve_types(cfg)
    sink = _HangingSink(types["hung"].topic)
    router = Router(types, sink, cfg.kafka, cfg.server)
    router.start()
    target = _Target()
    try:
        t0 = time.monotonic()
        _ingest(router, target, 1, [b"fast", b"hung"], 100)
        await _until(lambda: (1, 0, Status.PERSISTED, 100) in target.answers)  # "fast" is type index 0
        assert not any(a[1] == 1 for a in target.answers)  # "hung" still waiting
        await _until(lambda: any(a[1] == 1 for a in target.answers))
        assert time.monotonic() - t0 >= 0.3  # not before stall_timeout_ms
        retry = [a for a in target.answers if a[1] == 1]
        assert retry == [(1, 1, Status.RETRY_LATER, 100, Reason.KAFKA_UNAVAILABLE, 10_000)]
        hung = router.lanes["hung"]
        assert hung.state is LaneState.SHEDDING and not hung.ring.accepting and hung.ring.used_bytes == 0
        # New events of the hung type are refused at once; the fast type still flows.
        enc = fp.BatchEncoder()
        enc.add(b"hung", struct.pack(">QQ", 2, 1), 1, None, b"y")
        enc.add(b"fast", struct.pack(">QQ", 2, 2), 1, None, b"y")
        reader = fp.FrameReader(1 << 20)
        reader.feed(enc.finish(2))
        reader.next_frame()
        _, answers, accepted, _, _ = router.ingest(reader, 1, None, target)
        assert [(a.type_index, a.status, a.reason) for a in answers] == \
            [(0, fp.STATUS_RETRY_LATER, fp.REASON_KAFKA_UNAVAILABLE)]  # "hung"; "fast" (1) was accepted
        assert accepted == 1
        await _until(lambda: sink.sent[types["fast"].topic] == 101)
    finally:
        await router.stop(time.monotonic())


class _SlowSink(BuildsRecordBatches):
    """Every produce takes a while: the broker is the bottleneck."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches):
        self.order.append(topic.rsplit(".", 1)[-1])
        await asyncio.sleep(0.03)
        batches.clear()


async def test_critical_types_go_first_when_kafka_is_slow():
    cfg = make_config("unused:1", {"aaa_low": {"priority": "low"}, "zzz_critical": {"priority": "critical"}},
                      kafka={"max_inflight_requests": 1, "batch_max_bytes": 1024, "linger_ms": 0})
    types = resolve_types(cfg)
    sink = _SlowSink()
    router = Router(types, sink, cfg.kafka, cfg.server)
    target = _Target()
    for seq in range(1, 6):  # five one-event units of each type, all waiting
        _ingest(router, target, seq, [b"aaa_low", b"zzz_critical"], 1, size=900)
    router.start()
    try:
        await _until(lambda: len(target.answers) == 10)
    finally:
        await router.stop(time.monotonic())
    assert sink.order.count("zzz_critical") == 5 and sink.order.count("aaa_low") == 5
    # Whoever got the first request, every critical unit is sent before a
    # second low one: the shared request slot is handed out by priority.
    last_critical = max(i for i, t in enumerate(sink.order) if t == "zzz_critical")
    second_low = [i for i, t in enumerate(sink.order) if t == "aaa_low"][1]
    assert last_critical < second_low, sink.order


class _HangsOnceSink(BuildsRecordBatches):
    """The first produce never returns; later ones succeed (a broker that hung, then recovered)."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent = 0

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches):
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()
        self.sent += sum(c for _, _, c in batches)
        batches.clear()


async def test_idle_lane_recovers_after_shedding():
    """Shed while the drain loop has nothing waiting (its only unit hung in
    flight): it must still probe and take events again."""
    cfg = make_config("unused:1", {"t": {}}, kafka={"stall_timeout_ms": 200, "retry_backoff_ms": 50, "linger_ms": 0})
    types = resolve_types(cfg)
    sink = _HangsOnceSink()
    router = Router(types, sink, cfg.kafka, cfg.server)
    router.start()
    target = _Target()
    lane = router.lanes["t"]
    try:
        _ingest(router, target, 1, [b"t"], 10)
        await _until(lambda: lane.stats.sheds == 1)
        assert target.answers[0][2] == Status.RETRY_LATER
        await _until(lambda: lane.ring.accepting)  # probed and accepting again
        _ingest(router, target, 2, [b"t"], 10)
        await _until(lambda: (2, 0, Status.PERSISTED, 10) in target.answers)
        assert lane.state is LaneState.DELIVERING
    finally:
        await router.stop(time.monotonic())


class _RecordingHangSink(BuildsRecordBatches):
    def __init__(self) -> None:
        self.sent_topics: list[str] = []

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches):
        self.sent_topics.append(topic.rsplit(".", 1)[-1])
        await asyncio.Event().wait()  # never answers


async def test_unit_shed_while_waiting_for_a_request_slot_is_never_sent():
    """Its events were already handed back: sending them too would only make duplicates."""
    cfg = make_config("unused:1", {"hog": {"priority": "critical"}, "low": {"priority": "low"}},
                      kafka={"max_inflight_requests": 1, "stall_timeout_ms": 60_000, "linger_ms": 0,
                             "retry_backoff_ms": 10_000})
    types = resolve_types(cfg)
    sink = _RecordingHangSink()
    router = Router(types, sink, cfg.kafka, cfg.server)
    router.start()
    target = _Target()
    try:
        _ingest(router, target, 1, [b"hog"], 5)
        await _until(lambda: sink.sent_topics == ["hog"])  # hog holds the only request slot
        _ingest(router, target, 2, [b"low"], 5)
        await asyncio.sleep(0.05)  # low's unit is built and waits for the slot
        router.lanes["low"].shed("test: stalled while waiting")  # what the watchdog does
        router.lanes["hog"].shed("test: stalled")  # frees the slot; low's waiter gets it
        await asyncio.sleep(0.1)
        assert sink.sent_topics == ["hog"]
        assert {a[:3] for a in target.answers} == {(1, 0, Status.RETRY_LATER), (2, 0, Status.RETRY_LATER)}
    finally:
        await router.stop(time.monotonic())
