"""Per-type lanes: each event type's ring, its drain task and its pending acks.

A ring (``_fastpath.TypeRing``) holds a type's events; its lane drains them
into the sink in *units* (one run of entries, one record batch per partition)
with up to ``max_inflight_batches_per_type`` units in flight, through its
``TopicWriter`` (kafka/writer.py). Each type has its own task, so a slow or
failing topic never holds up the others.

Liveness over lateness: a type that cannot be delivered must not hold its
producers' in-flight windows either, or their batches of other types would
stop too. So a lane that has not delivered for ``stall_timeout_ms`` (or that
hits an error that retrying cannot fix) *sheds*: it answers every event it
holds with retry-later, drops them, and answers new events of that type
retry-later at once, while it probes the topic with back-off. When a probe
succeeds it accepts again; the first delivered unit ends the episode.

``Lane`` acknowledges once Kafka has a unit; ``spool.lane.SpoolLane``
overrides what it takes (records for the disk spool) and when it
acknowledges (after the write). Both answer the batch parts of acks.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from enum import Enum
from typing import NamedTuple

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_BUDGET_SHARE, EventType, KafkaConfig, SpoolConfig
from eventbroker.gateway.acks import AckTarget, BatchPart
from eventbroker.kafka.errors import topic_unwritable
from eventbroker.kafka.sink import KafkaBatch, Sink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.kafka.writer import TopicWriter, WriterStats, drain_until
from eventbroker.protocol import Reason

log = logging.getLogger("eventbroker.router")  # the name the lanes have always logged under


class Unit:
    __slots__ = ("batches", "n_events", "n_bytes", "end_seq", "end_off", "contribs", "done", "created")

    def __init__(self, batches: list[KafkaBatch], n_events: int, n_bytes: int, end_seq: int, end_off: int) -> None:
        self.batches = batches
        self.n_events = n_events
        self.n_bytes = n_bytes
        self.end_seq = end_seq
        self.end_off = end_off
        self.contribs: list[tuple[BatchPart, int]] = []
        self.done = False
        self.created = time.monotonic()


class LaneState(Enum):
    DELIVERING = "delivering"  # healthy
    SHEDDING = "shedding"  # answering retry-later, probing
    PROBING = "probing"  # accepting again; the next delivery decides


class LaneStats(WriterStats):
    __slots__ = ("events_persisted", "units_sent", "sheds", "events_shed")

    def __init__(self) -> None:
        super().__init__()
        self.events_persisted = 0
        self.units_sent = 0
        self.sheds = 0
        self.events_shed = 0


class SpoolSnapshot(NamedTuple):
    backlog_bytes: int
    events_forwarded: int
    write_failures: int
    damaged_bytes_skipped: int


class LaneSnapshot(NamedTuple):
    """A lane's counters and gauges, read when metrics are scraped."""

    events_received: int
    bytes_received: int
    events_persisted: int
    events_handed_back: int
    send_failures: int
    ring_used_bytes: int
    ring_capacity_bytes: int
    state: LaneState
    spool: SpoolSnapshot | None = None
    batch_bytes: int = 0  # Kafka record batches built, uncompressed
    compressed_bytes: int = 0  # the same as sent (after the type's compression)


class Lane:
    """Drains one type's ring into its topic; acknowledges once Kafka has it."""

    def __init__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots) -> None:
        self.stats = LaneStats()
        self.writer = TopicWriter(etype, sink, kcfg, requests, self.stats, log)
        self.ring = fp.TypeRing(
            etype.name,
            capacity_bytes=etype.ring_bytes,
            max_event_bytes=etype.max_event_bytes,
            by_key=etype.partitioning == "key",
            enabled=etype.enabled,
        )
        self._parts: deque[BatchPart] = deque()  # not yet fully taken into units
        self._units: deque[Unit] = deque()  # in flight, in ring order
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(kcfg.max_inflight_batches_per_type)
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.state = LaneState.DELIVERING
        self._shed_backoff_s = kcfg.retry_backoff_ms / 1000
        self.shed_reason: int = Reason.KAFKA_UNAVAILABLE  # what producers are told when this type sheds
        self.ack_seconds = None  # a histogram child (ops/metrics.py), when metrics are on

    # The type and the Kafka settings in force live in the writer (a reload replaces them).
    @property
    def etype(self) -> EventType:
        return self.writer.etype

    @property
    def _kcfg(self) -> KafkaConfig:
        return self.writer.kcfg

    # what the router and the daemon ask

    @property
    def priority_rank(self) -> int:
        return self.writer.rank

    @property
    def retry_after_ms(self) -> int:
        """Back-off hint for producers while this type is shedding."""
        return max(100, int(self._shed_backoff_s * 1000))

    @property
    def idle(self) -> bool:
        return self.ring.used_bytes == 0

    @property
    def accepting(self) -> bool:
        return self.ring.accepting

    @property
    def acks_without_kafka(self) -> bool:
        """Whether this type's producers are acknowledged while Kafka is away."""
        return False

    @property
    def holds_spool(self) -> bool:
        """Whether the lane holds a spool directory (nobody else may deliver it)."""
        return False

    def snapshot(self) -> LaneSnapshot:
        ring, stats = self.ring, self.stats
        return LaneSnapshot(ring.events_in, ring.bytes_in, stats.events_persisted, stats.events_shed,
                            stats.send_failures, ring.used_bytes, ring.capacity_bytes, self.state,
                            batch_bytes=stats.batch_bytes, compressed_bytes=stats.compressed_bytes)

    def set_histograms(self, produce_seconds, ack_seconds) -> None:
        self.writer.produce_seconds = produce_seconds
        self.ack_seconds = ack_seconds

    def update(self, etype: EventType, kcfg: KafkaConfig, budget_limit_bytes: int, spool_cfg: SpoolConfig) -> None:
        """Apply a reloaded config (same topic and ack) to the running lane."""
        self.writer.etype = etype
        self.writer.kcfg = kcfg
        ring = self.ring
        ring.enabled = etype.enabled
        ring.max_event_bytes = etype.max_event_bytes
        ring.capacity_bytes = etype.ring_bytes
        ring.by_key = etype.partitioning == "key"
        ring.admit_limit_bytes = int(budget_limit_bytes * PRIORITY_BUDGET_SHARE[etype.priority])

    def add_part(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        """A batch part the splitter just wrote into the ring: answer it when delivered."""
        self._parts.append(BatchPart(target, batch_seq, type_index, count))
        self._wakeup.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"lane:{self.etype.name}")
        self._watchdog = loop.create_task(self._watch(), name=f"lane-watchdog:{self.etype.name}")

    async def stop(self, deadline: float) -> None:
        """Finish what is in the ring until ``deadline`` (monotonic), then stop."""
        await self._drain_ring(deadline)
        self._stopping = True
        self._wakeup.set()
        tasks = [t for t in (self._task, self._watchdog) if t is not None]
        for t in tasks + list(self._sends):
            t.cancel()
        await asyncio.gather(*tasks, *self._sends, return_exceptions=True)

    async def retire(self, deadline: float) -> None:
        """The type was removed from the config: it takes no more events (the
        router stopped routing to it); deliver what it holds until
        ``deadline``, then hand the rest back."""
        await self.stop(deadline)
        if not self.idle:
            self.shed("its type was removed from the config")

    def can_come_back(self, etype: EventType) -> bool:
        """Whether a reload that adds the type back while this lane retires may reuse it."""
        return False

    def abandon(self) -> None:
        """Release what the lane holds without ever starting it (a reload that failed)."""

    async def _drain_ring(self, deadline: float) -> bool:
        return await drain_until(lambda: self.idle or self.state is LaneState.SHEDDING, deadline, self._wakeup.set)

    # the drain loop

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not silently stop a type
                log.exception("type %s: drain loop failed; handing its events back", self.etype.name)
                self.shed("internal error in the drain loop")
                await asyncio.sleep(self._shed_backoff_s)

    async def _drain(self) -> None:
        """The drain loop: probe while shedding, sleep while the ring is empty,
        else take the next step (``_drain_step``: what a lane does with its events)."""
        ring = self.ring
        while not self._stopping:
            if self.state is LaneState.SHEDDING:
                await self._probe()
                continue
            if ring.pending_events == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._drain_step()

    async def _drain_step(self) -> None:
        """Take the next unit and send it (up to max_inflight_batches_per_type in flight)."""
        kcfg = self._kcfg  # a reload may replace it
        linger_s = kcfg.linger_ms / 1000
        requests = self.writer.requests
        if linger_s and self.ring.pending_bytes < kcfg.batch_max_bytes and not self._units:
            await asyncio.sleep(linger_s)
        await self._slots.acquire()
        try:
            unit = await self._take_unit() if self.state is not LaneState.SHEDDING else None
        except BaseException:
            self._slots.release()
            raise
        if unit is None:
            self._slots.release()
            return
        # The shared request slots: when Kafka is slow, the most
        # important types' units are sent first.
        await self.writer.take_request_slot(self._slots)
        if unit.done:  # shed while we waited: its events were handed back
            requests.release()
            self._slots.release()
            return
        self.writer.launch(self._deliver(unit), self._slots, self._sends)

    async def _take_unit(self) -> Unit | None:
        if not await self.writer.ensure_partitions(self._metadata_failed):
            return None
        r = self.writer.take_unit(self.ring, self._kcfg.batch_max_bytes)
        if r is None:
            return None
        unit = Unit(*r)
        self._attribute(unit)
        self._units.append(unit)
        return unit

    def _metadata_failed(self, e: Exception) -> bool:
        if topic_unwritable(e):
            self.shed(f"topic {self.etype.topic} cannot be written ({type(e).__name__})")
        return self.state is LaneState.SHEDDING

    def _attribute(self, unit: Unit) -> None:
        """Attribute the unit's events to the batch parts they came from, in order."""
        need = unit.n_events
        parts = self._parts
        while need:
            part = parts[0]
            take = part.unassigned if part.unassigned <= need else need
            part.unassigned -= take
            need -= take
            unit.contribs.append((part, take))
            if part.unassigned == 0:
                parts.popleft()

    async def _deliver(self, unit: Unit) -> None:
        try:
            refused = await self.writer.send_retrying(unit.batches, lambda e: not e.retriable)
            if refused is not None:
                hint = " (lower kafka.batch_max_bytes below the topic's max.message.bytes)" if refused.too_large else ""
                self.shed(f"Kafka refuses writes to {self.etype.topic}: {refused}{hint}")
                return
            self._finish(unit)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: hand the type's events back rather than stall it
            log.exception("type %s: delivery failed unexpectedly", self.etype.name)
            self.shed("internal error while delivering")

    def _finish(self, unit: Unit) -> None:
        if unit.done:
            return
        unit.done = True
        self.stats.units_sent += 1
        self.stats.events_persisted += unit.n_events
        recovered = self.writer.recovered()
        if self.state is not LaneState.DELIVERING or recovered:
            log.info("type %s: delivering again", self.etype.name)
            self.state = LaneState.DELIVERING
            self._shed_backoff_s = self._kcfg.retry_backoff_ms / 1000
        ack_seconds = self.ack_seconds
        now = time.monotonic()
        for part, n in unit.contribs:
            part.unacked -= n
            if part.unacked == 0 and not part.target.closed:
                part.target.part_persisted(part.batch_seq, part.type_index, part.count)
                if ack_seconds is not None:
                    ack_seconds.observe(now - part.created)
        units = self._units
        while units and units[0].done:
            u = units.popleft()
            self.ring.release(u.n_bytes, u.end_seq, u.end_off)

    # liveness

    async def _watch(self) -> None:
        """Shed when nothing has been delivered for stall_timeout_ms."""
        while not self._stopping:
            stall_s = self._kcfg.stall_timeout_ms / 1000  # a reload may change it
            await asyncio.sleep(max(0.05, stall_s / 4))
            try:
                self._check_stall(stall_s)
            except Exception:
                log.exception("type %s: watchdog failed", self.etype.name)

    def _check_stall(self, stall_s: float) -> None:
        if self.state is LaneState.SHEDDING:
            return
        now = time.monotonic()
        oldest = self._units[0].created if self._units else 0.0
        failing_since = self.writer.metadata_failing_since
        if oldest and now - oldest > stall_s:
            self.shed(self._stalled(now - oldest))
        elif failing_since and now - failing_since > stall_s:
            self.shed(f"no metadata for {self.etype.topic} for {now - failing_since:.1f}s")

    def _stalled(self, seconds: float) -> str:
        return f"no delivery to {self.etype.topic} for {seconds:.1f}s"

    def shed(self, why: str, reason: int | None = None) -> None:
        """Answer everything this type holds retry-later, drop it, stop accepting."""
        if self.state is LaneState.SHEDDING:
            return
        if reason is None:
            reason = self.shed_reason
        if self.state is LaneState.PROBING:  # the probe failed: back off further
            self._shed_backoff_s = self.writer.next_backoff_s(self._shed_backoff_s)
        self.state = LaneState.SHEDDING
        self.ring.accepting = False
        self.ring.refuse_reason = reason
        self.stats.sheds += 1
        self._wakeup.set()  # the drain loop may be idle: it must start probing
        for t in list(self._sends):
            t.cancel()
        parts: dict[int, BatchPart] = {}
        for unit in self._units:
            for part, _ in unit.contribs:
                parts[id(part)] = part
        for part in self._parts:
            parts[id(part)] = part
        retry_ms = self.retry_after_ms
        answered = 0
        for part in parts.values():
            if part.unacked and not part.target.closed:
                part.target.part_retry(part.batch_seq, part.type_index, part.count, reason, retry_ms)
                answered += part.count
            part.unacked = 0
        for unit in self._units:
            unit.done = True
        self._units.clear()
        self._parts.clear()
        self.ring.discard_all()
        self.writer.forget_partitions()
        self.stats.events_shed += answered
        log.warning(
            "type %s: %s; answering its producers retry-later (%d events handed back) until it recovers",
            self.etype.name, why, answered,
        )

    async def _probe(self) -> None:
        await asyncio.sleep(self._shed_backoff_s)
        why = await self._probe_problem()
        if why:
            self.writer.failed(why)
            self._shed_backoff_s = self.writer.next_backoff_s(self._shed_backoff_s)
            return
        log.info("type %s: %s; accepting events", self.etype.name, self._probe_passed())
        self.state = LaneState.PROBING
        self.ring.accepting = True

    def _probe_passed(self) -> str:
        return f"topic {self.etype.topic} answers again"

    async def _probe_problem(self) -> str:
        """Why the type still cannot take events; empty when it can."""
        writer = self.writer
        try:
            writer.partitions = await writer.sink.partitions(self.etype.topic)
        except Exception as e:
            return f"probe of {self.etype.topic}: {e!r}"
        return ""
