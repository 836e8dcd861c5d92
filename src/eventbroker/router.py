"""Per-type lanes: each event type's ring, its drain task and its pending acks.

A ring (``_fastpath.TypeRing``) holds a type's events; its lane drains them
into the sink in *units* (one run of entries, one record batch per partition)
with up to ``max_inflight_batches_per_type`` units in flight. Each type has
its own task, so a type whose topic is slow or failing never holds up the
others: its ring fills, and producers get retry-later for that type only.

Acks: a producer's batch part for one type is a *segment*. A unit covers
whole or partial segments; when every event of a segment has been
acknowledged by Kafka, the segment's connection is told, and it sends the
ACK entry. All of this is per batch part, never per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_ORDER, EventType, KafkaConfig, ServerConfig
from eventbroker.sinks import Sink

log = logging.getLogger("eventbroker.router")


class AckTarget(Protocol):
    closed: bool

    def part_persisted(self, batch_seq: int, type_index: int, count: int) -> None: ...


class Segment:
    __slots__ = ("target", "batch_seq", "type_index", "count", "unassigned", "unacked")

    def __init__(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        self.target = target
        self.batch_seq = batch_seq
        self.type_index = type_index
        self.count = count
        self.unassigned = count
        self.unacked = count


class Unit:
    __slots__ = ("batches", "n_events", "n_bytes", "end_seq", "end_off", "contribs", "done", "created")

    def __init__(self, batches, n_events: int, n_bytes: int, end_seq: int, end_off: int) -> None:
        self.batches = batches
        self.n_events = n_events
        self.n_bytes = n_bytes
        self.end_seq = end_seq
        self.end_off = end_off
        self.contribs: list[tuple[Segment, int]] = []
        self.done = False
        self.created = time.monotonic()


class LaneStats:
    __slots__ = ("events_persisted", "units_sent", "send_failures", "last_error")

    def __init__(self) -> None:
        self.events_persisted = 0
        self.units_sent = 0
        self.send_failures = 0
        self.last_error = ""


class Lane:
    """Drains one type's ring into the sink."""

    def __init__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig) -> None:
        self.etype = etype
        self.sink = sink
        self.ring = fp.TypeRing(
            etype.name,
            capacity_bytes=etype.ring_bytes,
            max_event_bytes=etype.max_event_bytes,
            by_key=etype.partitioning == "key",
            enabled=etype.enabled,
        )
        self.ring.lane = self
        self._kcfg = kcfg
        self._segments: deque[Segment] = deque()  # not yet fully taken into units
        self._units: deque[Unit] = deque()  # in flight, in ring order
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(kcfg.max_inflight_batches_per_type)
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._partitions = 0
        self._sticky = 0
        self._stopping = False
        self.stats = LaneStats()

    @property
    def priority_rank(self) -> int:
        return PRIORITY_ORDER[self.etype.priority]

    def add_segment(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        self._segments.append(Segment(target, batch_seq, type_index, count))
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        return self.ring.used_bytes == 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lane:{self.etype.name}")

    async def stop(self, deadline: float) -> None:
        """Finish what is in the ring until ``deadline`` (monotonic), then stop."""
        while not self.idle and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._sends):
            t.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)

    async def _run(self) -> None:
        ring = self.ring
        kcfg = self._kcfg
        linger_s = kcfg.linger_ms / 1000
        while not self._stopping:
            if ring.pending_events == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if linger_s and ring.pending_bytes < kcfg.batch_max_bytes and not self._units:
                await asyncio.sleep(linger_s)
            await self._slots.acquire()
            try:
                unit = await self._take_unit()
            except BaseException:
                self._slots.release()
                raise
            if unit is None:
                self._slots.release()
                continue
            if self.sink.builds_batches:
                t = asyncio.get_running_loop().create_task(self._deliver(unit))
                self._sends.add(t)
                t.add_done_callback(self._sends.discard)
            else:
                self._finish(unit)
                self._slots.release()

    async def _take_unit(self) -> Unit | None:
        ring = self.ring
        if self.sink.builds_batches:
            while self._partitions == 0:
                try:
                    self._partitions = await self.sink.partitions(self.etype.topic)
                except Exception as e:  # broker down, topic missing: keep trying
                    self._note_failure(f"metadata for {self.etype.topic}: {e!r}")
                    await asyncio.sleep(self._kcfg.retry_backoff_ms / 1000)
            self._sticky = (self._sticky + 1) % self._partitions
            r = ring.build_unit(self._kcfg.batch_max_bytes, self._partitions, self._sticky)
            if r is None:
                return None
            unit = Unit(*r)
        else:
            r2 = ring.skip_unit(self._kcfg.batch_max_bytes)
            if r2 is None:
                return None
            unit = Unit([], *r2)
        # Attribute the unit's events to the segments they came from, in order.
        need = unit.n_events
        segs = self._segments
        while need:
            seg = segs[0]
            take = seg.unassigned if seg.unassigned <= need else need
            seg.unassigned -= take
            need -= take
            unit.contribs.append((seg, take))
            if seg.unassigned == 0:
                segs.popleft()
        self._units.append(unit)
        return unit

    def _note_failure(self, what: str) -> None:
        self.stats.send_failures += 1
        if what != self.stats.last_error:
            log.warning("type %s: %s; retrying", self.etype.name, what)
        self.stats.last_error = what

    async def _deliver(self, unit: Unit) -> None:
        backoff = self._kcfg.retry_backoff_ms / 1000
        max_backoff = self._kcfg.retry_backoff_max_ms / 1000
        try:
            while True:
                try:
                    await self.sink.send(self.etype.topic, unit.batches)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._note_failure(f"produce to {self.etype.topic} failed: {e!r}")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, max_backoff)
            if self.stats.last_error:
                log.info("type %s: delivering again", self.etype.name)
                self.stats.last_error = ""
            self._finish(unit)
        finally:
            self._slots.release()

    def _finish(self, unit: Unit) -> None:
        unit.done = True
        self.stats.units_sent += 1
        self.stats.events_persisted += unit.n_events
        for seg, n in unit.contribs:
            seg.unacked -= n
            if seg.unacked == 0 and not seg.target.closed:
                seg.target.part_persisted(seg.batch_seq, seg.type_index, seg.count)
        units = self._units
        while units and units[0].done:
            u = units.popleft()
            self.ring.release(u.n_bytes, u.end_seq, u.end_off)


class Router:
    """The registry's rings and lanes, and the native splitter in front of them."""

    def __init__(self, types: dict[str, EventType], sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig):
        self.core = fp.Router(
            max_events_per_batch=server_cfg.max_events_per_batch,
            max_event_bytes=server_cfg.max_event_bytes,
        )
        self.lanes: dict[str, Lane] = {}
        for name, et in types.items():
            lane = Lane(et, sink, kcfg, server_cfg)
            self.lanes[name] = lane
            self.core.add(lane.ring)

    def start(self) -> None:
        # Critical types' tasks start first; each type then runs on its own.
        for lane in sorted(self.lanes.values(), key=lambda ln: ln.priority_rank):
            lane.start()

    async def stop(self, deadline: float) -> None:
        await asyncio.gather(*(lane.stop(deadline) for lane in self.lanes.values()))

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())
