"""Per-type lanes: each event type's ring, its drain task and its pending acks.

A ring (``_fastpath.TypeRing``) holds a type's events; its lane drains them
into the sink in *units* (one run of entries, one record batch per partition)
with up to ``max_inflight_batches_per_type`` units in flight. Each type has
its own task, so a slow or failing topic never holds up the others.

Liveness over lateness: a type that cannot be delivered must not hold its
producers' in-flight windows either, or their batches of other types would
stop too. So a lane that has not delivered for ``stall_timeout_ms`` (or that
hits an error that retrying cannot fix) *sheds*: it answers every event it
holds with retry-later, drops them, and answers new events of that type
retry-later at once, while it probes the topic with back-off. When a probe
succeeds it accepts again; the first delivered unit closes the breaker.

Acks: a producer's batch part for one type is a *segment*. A unit covers
whole or partial segments; when every event of a segment has been
acknowledged by Kafka, the segment's connection is told, and it sends the
ACK entry. All of this is per batch part, never per event.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

from aiokafka.errors import (
    InvalidTopicError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from eventbroker import _fastpath as fp
from eventbroker.config import (
    PRIORITY_BUDGET_SHARE,
    PRIORITY_ORDER,
    EventType,
    KafkaConfig,
    ServerConfig,
    SpoolConfig,
)
from eventbroker.protocol import Reason
from eventbroker.sinks import ProduceFailed, Sink
from eventbroker.spool import SpoolLog

log = logging.getLogger("eventbroker.router")

_FATAL_METADATA = (UnknownTopicOrPartitionError, InvalidTopicError, TopicAuthorizationFailedError)


class AckTarget(Protocol):
    closed: bool

    def part_persisted(self, batch_seq: int, type_index: int, count: int) -> None: ...

    def part_retry(self, batch_seq: int, type_index: int, count: int, reason: int, retry_after_ms: int) -> None: ...


class Segment:
    __slots__ = ("target", "batch_seq", "type_index", "count", "unassigned", "unacked", "created")

    def __init__(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        self.target = target
        self.batch_seq = batch_seq
        self.type_index = type_index
        self.count = count
        self.unassigned = count
        self.unacked = count
        self.created = time.monotonic()


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


class PrioritySlots:
    """A counting semaphore whose waiters are served by priority rank, then
    in arrival order: when Kafka is slow, critical types' units go first."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, rank: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class LaneState(Enum):
    CLOSED = "delivering"  # healthy
    OPEN = "shedding"  # answering retry-later, probing
    HALF_OPEN = "probing"  # accepting again; the next delivery decides


class LaneStats:
    __slots__ = ("events_persisted", "units_sent", "send_failures", "sheds", "events_shed", "last_error")

    def __init__(self) -> None:
        self.events_persisted = 0
        self.units_sent = 0
        self.send_failures = 0
        self.sheds = 0
        self.events_shed = 0
        self.last_error = ""


class _Shed(Exception):
    pass


class Lane:
    """Drains one type's ring into the sink."""

    def __init__(
        self,
        etype: EventType,
        sink: Sink,
        kcfg: KafkaConfig,
        server_cfg: ServerConfig,
        requests: PrioritySlots | None = None,
    ) -> None:
        self.etype = etype
        self._requests = requests or PrioritySlots(kcfg.max_inflight_requests)
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
        self._watchdog: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._partitions = 0
        self._sticky = 0
        self._stopping = False
        self._metadata_failing_since = 0.0
        self._last_failure_log = 0.0
        self.state = LaneState.CLOSED
        self._shed_backoff_s = kcfg.retry_backoff_ms / 1000
        self.stats = LaneStats()
        self.shed_reason: int = Reason.KAFKA_UNAVAILABLE  # what producers are told when this type sheds
        # Histogram children (metrics.py); None when metrics are off.
        self.produce_seconds = None
        self.ack_seconds = None

    @property
    def priority_rank(self) -> int:
        return PRIORITY_ORDER[self.etype.priority]

    @property
    def retry_after_ms(self) -> int:
        """Back-off hint for producers while this type is shedding."""
        return max(100, int(self._shed_backoff_s * 1000))

    def update(self, etype: EventType, kcfg: KafkaConfig, budget_limit_bytes: int) -> None:
        """Apply a reloaded config (same topic and ack) to the running lane."""
        self.etype = etype
        self._kcfg = kcfg
        ring = self.ring
        ring.enabled = etype.enabled
        ring.max_event_bytes = etype.max_event_bytes
        ring.capacity_bytes = etype.ring_bytes
        ring.by_key = etype.partitioning == "key"
        ring.admit_limit_bytes = int(budget_limit_bytes * PRIORITY_BUDGET_SHARE[etype.priority])

    def add_segment(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        self._segments.append(Segment(target, batch_seq, type_index, count))
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        return self.ring.used_bytes == 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"lane:{self.etype.name}")
        self._watchdog = loop.create_task(self._watch(), name=f"lane-watchdog:{self.etype.name}")

    async def stop(self, deadline: float) -> None:
        """Finish what is in the ring until ``deadline`` (monotonic), then stop."""
        while not self.idle and time.monotonic() < deadline and self.state is not LaneState.OPEN:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        tasks = [t for t in (self._task, self._watchdog) if t is not None]
        for t in tasks + list(self._sends):
            t.cancel()
        await asyncio.gather(*tasks, *self._sends, return_exceptions=True)

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
        ring = self.ring
        while not self._stopping:
            kcfg = self._kcfg  # a reload may replace it
            linger_s = kcfg.linger_ms / 1000
            if self.state is LaneState.OPEN:
                await self._probe()
                continue
            if ring.pending_events == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if linger_s and ring.pending_bytes < kcfg.batch_max_bytes and not self._units:
                await asyncio.sleep(linger_s)
            await self._slots.acquire()
            try:
                unit = await self._take_unit() if self.state is not LaneState.OPEN else None
            except _Shed:
                unit = None
            except BaseException:
                self._slots.release()
                raise
            if unit is None:
                self._slots.release()
                continue
            if not self.sink.builds_batches:
                try:
                    self._finish(unit)
                finally:
                    self._slots.release()
                continue
            # The shared request slots: when Kafka is slow, the most
            # important types' units are sent first.
            try:
                await self._requests.acquire(self.priority_rank)
            except BaseException:
                self._slots.release()
                raise
            if unit.done:  # shed while we waited: its events were handed back
                self._requests.release()
                self._slots.release()
                continue
            t = asyncio.get_running_loop().create_task(self._deliver(unit))
            self._sends.add(t)
            # Released here, not in _deliver: a task cancelled before its
            # first step never runs its own finally clause.
            t.add_done_callback(self._send_done)

    async def _take_unit(self) -> Unit | None:
        ring = self.ring
        if self.sink.builds_batches:
            while self._partitions == 0:
                try:
                    self._partitions = await self.sink.partitions(self.etype.topic)
                    self._metadata_failing_since = 0.0
                except Exception as e:  # broker down, topic missing
                    self._note_failure(f"metadata for {self.etype.topic}: {e!r}")
                    if isinstance(e, _FATAL_METADATA):
                        self.shed(f"topic {self.etype.topic} cannot be written ({type(e).__name__})")
                    if not self._metadata_failing_since:
                        self._metadata_failing_since = time.monotonic()
                    if self.state is LaneState.OPEN:
                        raise _Shed() from None
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
        self._attribute(unit)
        self._units.append(unit)
        return unit

    def _attribute(self, unit: Unit) -> None:
        """Attribute the unit's events to the segments they came from, in order."""
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

    def _note_failure(self, what: str) -> None:
        self.stats.send_failures += 1
        now = time.monotonic()
        if what != self.stats.last_error and now - self._last_failure_log > 1.0:  # at most 1/s
            log.warning("type %s: %s; retrying", self.etype.name, what)
            self._last_failure_log = now
        self.stats.last_error = what

    async def _deliver(self, unit: Unit) -> None:
        backoff = self._kcfg.retry_backoff_ms / 1000
        try:
            while True:
                try:
                    t0 = time.monotonic()
                    await self.sink.send(self.etype.topic, unit.batches)
                    if self.produce_seconds is not None:
                        self.produce_seconds.observe(time.monotonic() - t0)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._note_failure(f"produce to {self.etype.topic} failed: {e!r}")
                    if isinstance(e, ProduceFailed) and not e.retriable:
                        hint = (" (lower kafka.batch_max_bytes below the topic's max.message.bytes)"
                                if 10 in e.codes.values() else "")
                        self.shed(f"Kafka refuses writes to {self.etype.topic}: {e}{hint}")
                        return
                    await asyncio.sleep(backoff)
                    backoff = self._next_backoff(backoff)
            self._finish(unit)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: hand the type's events back rather than stall it
            log.exception("type %s: delivery failed unexpectedly", self.etype.name)
            self.shed("internal error while delivering")

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._slots.release()
        self._requests.release()

    def _finish(self, unit: Unit) -> None:
        if unit.done:
            return
        unit.done = True
        self.stats.units_sent += 1
        self.stats.events_persisted += unit.n_events
        if self.state is not LaneState.CLOSED or self.stats.last_error:
            log.info("type %s: delivering again", self.etype.name)
            self.state = LaneState.CLOSED
            self.stats.last_error = ""
            self._shed_backoff_s = self._kcfg.retry_backoff_ms / 1000
        ack_seconds = self.ack_seconds
        now = time.monotonic()
        for seg, n in unit.contribs:
            seg.unacked -= n
            if seg.unacked == 0 and not seg.target.closed:
                seg.target.part_persisted(seg.batch_seq, seg.type_index, seg.count)
                if ack_seconds is not None:
                    ack_seconds.observe(now - seg.created)
        units = self._units
        while units and units[0].done:
            u = units.popleft()
            self.ring.release(u.n_bytes, u.end_seq, u.end_off)

    def _next_backoff(self, seconds: float) -> float:
        return min(seconds * 2, self._kcfg.retry_backoff_max_ms / 1000)

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
        if self.state is LaneState.OPEN:
            return
        now = time.monotonic()
        oldest = self._units[0].created if self._units else 0.0
        if oldest and now - oldest > stall_s:
            self.shed(self._stalled(now - oldest))
        elif self._metadata_failing_since and now - self._metadata_failing_since > stall_s:
            self.shed(f"no metadata for {self.etype.topic} for {now - self._metadata_failing_since:.1f}s")

    def _stalled(self, seconds: float) -> str:
        return f"no delivery to {self.etype.topic} for {seconds:.1f}s"

    def shed(self, why: str, reason: int | None = None) -> None:
        """Answer everything this type holds retry-later, drop it, stop accepting."""
        if self.state is LaneState.OPEN:
            return
        if reason is None:
            reason = self.shed_reason
        if self.state is LaneState.HALF_OPEN:  # the probe failed: back off further
            self._shed_backoff_s = self._next_backoff(self._shed_backoff_s)
        self.state = LaneState.OPEN
        self.ring.accepting = False
        self.ring.refuse_reason = reason
        self.stats.sheds += 1
        self._wakeup.set()  # the drain loop may be idle: it must start probing
        for t in list(self._sends):
            t.cancel()
        segments: dict[int, Segment] = {}
        for unit in self._units:
            for seg, _ in unit.contribs:
                segments[id(seg)] = seg
        for seg in self._segments:
            segments[id(seg)] = seg
        retry_ms = self.retry_after_ms
        answered = 0
        for seg in segments.values():
            if seg.unacked and not seg.target.closed:
                seg.target.part_retry(seg.batch_seq, seg.type_index, seg.count, reason, retry_ms)
                answered += seg.count
            seg.unacked = 0
        for unit in self._units:
            unit.done = True
        self._units.clear()
        self._segments.clear()
        self.ring.discard_all()
        self._partitions = 0
        self._metadata_failing_since = 0.0
        self.stats.events_shed += answered
        log.warning(
            "type %s: %s; answering its producers retry-later (%d events handed back) until it recovers",
            self.etype.name, why, answered,
        )

    async def _probe(self) -> None:
        await asyncio.sleep(self._shed_backoff_s)
        try:
            self._partitions = await self.sink.partitions(self.etype.topic)
        except Exception as e:
            self._note_failure(f"probe of {self.etype.topic}: {e!r}")
            self._shed_backoff_s = self._next_backoff(self._shed_backoff_s)
            return
        log.info("type %s: topic %s answers again; accepting events", self.etype.name, self.etype.topic)
        self.state = LaneState.HALF_OPEN
        self.ring.accepting = True


class Router:
    """The registry's rings and lanes, and the native splitter in front of them."""

    def __init__(self, types: dict[str, EventType], sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig,
                 spool_cfg: SpoolConfig | None = None, spool_root: Path | None = None,
                 spool_root_provider: Callable[[], Path] | None = None):
        self.core = fp.Router(
            max_events_per_batch=server_cfg.max_events_per_batch,
            max_event_bytes=server_cfg.max_event_bytes,
        )
        self.budget = fp.MemoryBudget(server_cfg.memory_budget_bytes)
        self.requests = PrioritySlots(kcfg.max_inflight_requests)
        self.lanes: dict[str, Lane] = {}
        self._by_name: dict[bytes, Lane] = {}
        self._sink = sink
        self._retiring: set[asyncio.Task[None]] = set()
        self.retired_spools: list[Lane] = []  # removed spooled types still forwarding
        self._retiring_lanes: dict[str, Lane] = {}  # the same, by name (a reload may bring one back)
        self._retire_tasks: dict[str, asyncio.Task[None]] = {}
        spool_cfg = spool_cfg or SpoolConfig()
        # Where spooled types keep their logs: given, or from the provider (a
        # worker's slot, taken when the first spooled type needs it).
        self.spool_root: Path | None = spool_root
        self._spool_root_provider = spool_root_provider or spool_cfg.resolved_dir
        spools: list[SpoolLog] = []
        try:
            for name, et in types.items():
                lane = self._make_lane(et, sink, kcfg, server_cfg, spool_cfg, spools)
                self._add(name, lane, server_cfg)
        except BaseException:
            for sp in spools:  # a later type's spool failed to open: unlock the others
                sp.close()
            raise

    def _make_lane(self, et: EventType, sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig,
                   spool_cfg: SpoolConfig, spools: list[SpoolLog]) -> Lane:
        if et.ack != "spool":
            return Lane(et, sink, kcfg, server_cfg, self.requests)
        from eventbroker.spool_adopt import write_meta
        from eventbroker.spool_lane import SpoolLane  # it builds on Lane: imported here, not at the top

        if self.spool_root is None:
            self.spool_root = self._spool_root_provider()
        directory = self.spool_root / et.name
        spool = SpoolLog(directory, segment_bytes=spool_cfg.segment_bytes, fsync=spool_cfg.fsync, name=et.name)
        spool.open()
        spools.append(spool)
        write_meta(directory, et)
        log.info("type %s: acknowledged once in the disk spool %s (fsync %s)", et.name, directory, spool_cfg.fsync)
        return SpoolLane(et, sink, kcfg, server_cfg, self.requests, spool_cfg, spool)

    def _add(self, name: str, lane: Lane, server_cfg: ServerConfig) -> None:
        share = PRIORITY_BUDGET_SHARE[lane.etype.priority]
        lane.ring.attach_budget(self.budget, int(server_cfg.memory_budget_bytes * share))
        self.lanes[name] = lane
        self._by_name[lane.ring.name_bytes] = lane
        self.core.add(lane.ring)

    def reconfigure(self, types: dict[str, EventType], kcfg: KafkaConfig, server_cfg: ServerConfig,
                    spool_cfg: SpoolConfig) -> list[str]:
        """Apply a reloaded config: add, change and remove types, new limits.

        The caller has checked ``config.reload_blockers``. A removed type
        stops accepting at once (its events become unknown_type), delivers
        what it holds until ``drain_timeout_ms``, and hands back the rest."""
        changes: list[str] = []
        # New lanes first (opening a spool can fail): nothing changes unless all open.
        added: dict[str, Lane] = {}
        opened: list[SpoolLog] = []
        try:
            for name, et in types.items():
                if name in self.lanes:
                    continue
                back = self._retiring_lanes.get(name)
                if back is not None and back.etype.ack == et.ack and back.etype.topic == et.topic and \
                        not getattr(back, "finishing", False):
                    added[name] = back  # removed, still delivering its spool: it comes back as it is
                    continue
                added[name] = self._make_lane(et, self._sink, kcfg, server_cfg, spool_cfg, opened)
        except BaseException:
            for sp in opened:
                sp.close()
            raise
        self.core.max_events_per_batch = server_cfg.max_events_per_batch
        self.core.max_event_bytes = server_cfg.max_event_bytes
        if self.budget.limit_bytes != server_cfg.memory_budget_bytes:
            changes.append(f"memory budget {self.budget.limit_bytes} -> {server_cfg.memory_budget_bytes} bytes")
            self.budget.limit_bytes = server_cfg.memory_budget_bytes
        for name, et in types.items():
            lane = self.lanes.get(name)
            if lane is None:
                lane = added[name]
                if self._retiring_lanes.get(name) is lane:
                    del self._retiring_lanes[name]
                    task = self._retire_tasks.pop(name)
                    task.cancel()  # it keeps its spool, its forwarder and its tasks
                    self._add(name, lane, server_cfg)
                    lane.update(et, kcfg, server_cfg.memory_budget_bytes)
                    changes.append(f"added type {name} (back before its spool was delivered)")
                    continue
                self._add(name, lane, server_cfg)
                lane.start()
                changes.append(f"added type {name}")
                continue
            if lane.etype != et:
                diff = [k for k in ("priority", "max_event_bytes", "partitioning", "ring_bytes", "enabled")
                        if getattr(lane.etype, k) != getattr(et, k)]
                changes.append(f"type {name}: " + ", ".join(f"{k} {getattr(lane.etype, k)} -> {getattr(et, k)}"
                                                            for k in diff))
            lane.update(et, kcfg, server_cfg.memory_budget_bytes)
            if hasattr(lane, "update_spool"):
                lane.update_spool(spool_cfg)
        deadline = time.monotonic() + server_cfg.drain_timeout_ms / 1000
        for name in [n for n in self.lanes if n not in types]:
            lane = self.lanes.pop(name)
            self._by_name.pop(lane.ring.name_bytes, None)
            self.core.remove(name)
            t = asyncio.get_running_loop().create_task(self._retire(lane, deadline))
            self._retiring.add(t)
            t.add_done_callback(self._retiring.discard)
            if hasattr(lane, "retire"):
                self._retiring_lanes[name] = lane
                self._retire_tasks[name] = t
            changes.append(f"removed type {name}")
        return changes

    async def _retire(self, lane: Lane, deadline: float) -> None:
        retire = getattr(lane, "retire", None)
        if retire is not None:  # a spooled type still delivers what it acknowledged
            self.retired_spools.append(lane)
            try:
                await retire(deadline)
            finally:
                self.retired_spools.remove(lane)
                name = lane.etype.name
                if self._retiring_lanes.get(name) is lane:
                    del self._retiring_lanes[name]
                    self._retire_tasks.pop(name, None)
            return
        await lane.stop(deadline)
        if not lane.idle:
            lane.shed("its type was removed from the config")

    def lane_for(self, name: bytes) -> Lane | None:
        return self._by_name.get(name)

    def start(self) -> None:
        # Critical types' tasks start first; each type then runs on its own.
        for lane in sorted(self.lanes.values(), key=lambda ln: ln.priority_rank):
            lane.start()

    async def stop(self, deadline: float) -> None:
        retired = [lane.stop(deadline) for lane in self.retired_spools]
        await asyncio.gather(*(lane.stop(deadline) for lane in self.lanes.values()), *retired, *self._retiring)

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())
