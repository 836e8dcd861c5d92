"""The router: the native batch splitter in front of the registry's lanes.

A connection hands the router each EVENT_BATCH frame; the splitter
(``_fastpath.BatchSplitter``) checks it whole and copies each accepted part
into its type's ring, and the router registers those parts with their lanes
and turns the rest into ACK entries at once (rejected, or retry-later with a
back-off hint). Python work here is per batch part, never per event.

Lanes are made by a ``LaneFactory``: ``kafka_lanes`` here for types
acknowledged by Kafka; the spool's ``SpoolLanes`` adds types acknowledged
from the disk spool, so the router never needs to know about spools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_BUDGET_SHARE, EventType, KafkaConfig, ServerConfig, SpoolConfig
from eventbroker.errors import ConfigError
from eventbroker.gateway.acks import AckTarget
from eventbroker.gateway.lane import Lane
from eventbroker.kafka.sink import Sink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.protocol import AckEntry, Reason, Status
from eventbroker.schema import SchemaRegistry

log = logging.getLogger("eventbroker.router")

# Back-off hint for parts refused for lack of room (not a broken type).
_OVERLOADED_RETRY_MS = 200
_TYPE_UNAVAILABLE = (Reason.KAFKA_UNAVAILABLE, Reason.SPOOL_UNAVAILABLE)


class LaneFactory(Protocol):
    def __call__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots) -> Lane: ...


def kafka_lanes(etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots) -> Lane:
    """The lane factory for a gateway without a spool: every type is acked by Kafka."""
    if etype.ack != "kafka":
        raise ConfigError(f"type {etype.name}: ack = {etype.ack!r} needs a spool (eventbroker.spool.SpoolLanes)")
    return Lane(etype, sink, kcfg, requests)


class Ingested(NamedTuple):
    """What ``Router.ingest`` made of one batch."""

    batch_seq: int
    answers: list[AckEntry]  # answered now, configured types
    accepted: int  # parts accepted: answered when delivered
    encoded: bytes  # ACK entries for types no gateway ring has, encoded natively
    n_encoded: int

    @property
    def answered_now(self) -> bool:
        """Whether the batch gets an immediate ACK (a batch with no events gets an empty one)."""
        return bool(self.answers or self.n_encoded or not self.accepted)


class RouterStats:
    __slots__ = ("rejected", "retry_later")

    def __init__(self) -> None:
        # (type name, reason) -> events; names of unconfigured types are not
        # kept (producers choose them): they count under "<unknown>".
        self.rejected: dict[tuple[str, int], int] = {}
        self.retry_later: dict[tuple[str, int], int] = {}


class Router:
    """The registry's rings and lanes, and the native splitter in front of them."""

    def __init__(self, types: dict[str, EventType], sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig,
                 lanes: LaneFactory = kafka_lanes, schemas: SchemaRegistry | None = None,
                 keys: fp.UserKeys | None = None) -> None:
        self._splitter = fp.BatchSplitter(
            max_events_per_batch=server_cfg.max_events_per_batch,
            max_event_bytes=server_cfg.max_event_bytes,
            max_timestamp_ahead_ms=server_cfg.max_timestamp_ahead_ms,
            max_timestamp_behind_ms=server_cfg.max_timestamp_behind_ms,
        )
        self._budget = fp.MemoryBudget(server_cfg.memory_budget_bytes)
        self.requests = PrioritySlots(kcfg.max_inflight_requests)
        self.stats = RouterStats()
        self.lanes: dict[str, Lane] = {}
        self._by_name: dict[bytes, Lane] = {}
        self._sink = sink
        self._make = lanes
        self.schemas = schemas
        self.keys = keys  # users' data keys, for types with personal fields (eventbroker.privacy)
        # Removed types still delivering what they hold, oldest first (a name
        # removed, added back as a new lane and removed again is here twice).
        self._retiring: list[tuple[Lane, asyncio.Task[None]]] = []
        made = self._make_lanes(types.values(), kcfg)
        for name, lane in made.items():
            self._add(name, lane, server_cfg)

    def _make_lanes(self, types: Iterable[EventType], kcfg: KafkaConfig) -> dict[str, Lane]:
        """All of them or none: a lane that fails to open (its spool) releases the others."""
        made: dict[str, Lane] = {}
        try:
            for et in types:
                made[et.name] = self._make(et, self._sink, kcfg, self.requests)
        except BaseException:
            for lane in made.values():
                lane.abandon()
            raise
        return made

    def _add(self, name: str, lane: Lane, server_cfg: ServerConfig) -> None:
        share = PRIORITY_BUDGET_SHARE[lane.etype.priority]
        lane.ring.attach_budget(self._budget, int(server_cfg.memory_budget_bytes * share))
        self.lanes[name] = lane
        self._by_name[lane.ring.name_bytes] = lane
        lane.ring.schemas = self.schemas.get(name) if self.schemas is not None else None
        lane.ring.keys = self.keys
        self._splitter.add(lane.ring)

    # the hot path: once per batch

    def ingest(self, reader: fp.FrameReader, now_ms: int, allowed: frozenset[bytes] | None, target: AckTarget,
               shutting_down: bool = False) -> Ingested:
        """Split the reader's EVENT_BATCH frame into the rings.

        Returns the ACK entries for the parts answered now (rejected,
        retry-later) and how many parts were accepted; ``target`` is told about
        those when they are delivered. Parts of types no ring has are answered
        natively (``encoded``): the Python work here is per configured type in
        the batch, however many unknown names a producer lists."""
        seq, names, results, encoded, n_encoded, unknown, invalid = \
            self._splitter.ingest_answering(reader, now_ms, allowed)
        key: tuple[str, int]
        if unknown:
            key = ("<unknown>", Reason.UNKNOWN_TYPE)
            self.stats.rejected[key] = self.stats.rejected.get(key, 0) + unknown
        if invalid:
            key = ("<unknown>", Reason.INVALID_TYPE_NAME)
            self.stats.rejected[key] = self.stats.rejected.get(key, 0) + invalid
        answers: list[AckEntry] = []
        accepted = 0
        by_name = self._by_name
        for ti, status, reason, count, indices, ring, details in results:
            if ring is not None:
                by_name[names[ti]].add_part(target, seq, ti, count)
                accepted += 1
                continue
            lane = by_name.get(names[ti])
            key = (lane.etype.name if lane is not None else "<unknown>", reason)
            counts = self.stats.rejected if status == Status.REJECTED else self.stats.retry_later
            counts[key] = counts.get(key, 0) + count
            retry_ms = 0
            if status == Status.RETRY_LATER:
                if reason == Reason.KEY_UNAVAILABLE:  # the key cache's estimate of its load
                    retry_ms = self.keys.retry_after_ms if self.keys is not None else 1000
                elif reason in _TYPE_UNAVAILABLE and lane is not None:
                    retry_ms = lane.retry_after_ms
                else:
                    retry_ms = _OVERLOADED_RETRY_MS
                    if shutting_down:
                        reason = Reason.SHUTTING_DOWN
            answers.append(AckEntry(ti, status, reason, count, retry_ms, tuple(indices or ()), tuple(details or ())))
        return Ingested(seq, answers, accepted, encoded, n_encoded)

    def set_keys(self, keys: fp.UserKeys | None) -> None:
        """Give every type the key cache (a reload that adds the first personal fields)."""
        self.keys = keys
        for lane in self.lanes.values():
            lane.ring.keys = keys

    def shed_all(self, why: str) -> None:
        """Hand back everything every type holds (after a bug while accepting a
        batch, rings may hold events no batch part answers for)."""
        for lane in self.lanes.values():
            lane.shed(why)

    # what the daemon and metrics ask

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())

    @property
    def used_bytes(self) -> int:
        return sum(lane.ring.used_bytes for lane in self.lanes.values())

    @property
    def budget_used_bytes(self) -> int:
        return self._budget.used_bytes

    @property
    def budget_limit_bytes(self) -> int:
        return self._budget.limit_bytes

    def spooled_type_names(self) -> set[str]:
        """Types whose spool directory a lane of this router holds, retiring ones included."""
        lanes = [*self.lanes.values(), *(lane for lane, _ in self._retiring)]
        return {lane.etype.name for lane in lanes if lane.holds_spool}

    def accepts_without_kafka(self) -> bool:
        """Whether some type is acknowledged (and accepting) while Kafka is away."""
        return any(lane.acks_without_kafka and lane.accepting for lane in self.lanes.values())

    # lifecycle

    def start(self) -> None:
        # Critical types' tasks start first; each type then runs on its own.
        for lane in sorted(self.lanes.values(), key=lambda ln: ln.priority_rank):
            lane.start()

    async def stop(self, deadline: float) -> None:
        retiring = list(self._retiring)
        await asyncio.gather(*(lane.stop(deadline) for lane in self.lanes.values()),
                             *(lane.stop(deadline) for lane, _ in retiring), *(task for _, task in retiring))

    def reconfigure(self, types: dict[str, EventType], kcfg: KafkaConfig, server_cfg: ServerConfig,
                    spool_cfg: SpoolConfig, schemas: SchemaRegistry | None = None) -> list[str]:
        """Apply a reloaded config: add, change and remove types, new limits.

        The caller has checked ``config.reload_blockers``. A removed type
        stops accepting at once (its events become unknown_type) and retires:
        a Kafka-acked type delivers what it holds until ``drain_timeout_ms``
        and hands back the rest; a spooled one delivers its spool."""
        changes: list[str] = []
        # New lanes first (opening a spool can fail): nothing changes unless all open.
        back: dict[str, Lane] = {}
        new_types = []
        for name, et in types.items():
            if name in self.lanes:
                continue
            retiring = [lane for lane, _ in self._retiring if lane.etype.name == name]
            if retiring and retiring[-1].can_come_back(et):
                back[name] = retiring[-1]  # removed, still delivering its spool: it comes back as it is
            else:
                new_types.append(et)
        added = self._make_lanes(new_types, kcfg)
        old_schemas, self.schemas = self.schemas, schemas
        self._splitter.max_events_per_batch = server_cfg.max_events_per_batch
        self._splitter.max_event_bytes = server_cfg.max_event_bytes
        self._splitter.max_timestamp_ahead_ms = server_cfg.max_timestamp_ahead_ms
        self._splitter.max_timestamp_behind_ms = server_cfg.max_timestamp_behind_ms
        if self._budget.limit_bytes != server_cfg.memory_budget_bytes:
            changes.append(f"memory budget {self._budget.limit_bytes} -> {server_cfg.memory_budget_bytes} bytes")
            self._budget.limit_bytes = server_cfg.memory_budget_bytes
        budget = server_cfg.memory_budget_bytes
        for name, et in types.items():
            lane = self.lanes.get(name)
            if lane is None and name in back:
                lane = back[name]
                task = next(t for ln, t in self._retiring if ln is lane)
                self._retiring.remove((lane, task))
                task.cancel()  # it keeps its spool, its forwarder and its tasks
                self._add(name, lane, server_cfg)
                lane.update(et, kcfg, budget, spool_cfg)
                changes.append(f"added type {name} (back before its spool was delivered)")
                continue
            if lane is None:
                lane = added[name]
                self._add(name, lane, server_cfg)
                lane.update(et, kcfg, budget, spool_cfg)
                lane.start()
                changes.append(f"added type {name}")
                continue
            if lane.etype != et:
                diff = [k for k in ("priority", "max_event_bytes", "partitioning", "ring_bytes", "enabled")
                        if getattr(lane.etype, k) != getattr(et, k)]
                changes.append(f"type {name}: " + ", ".join(f"{k} {getattr(lane.etype, k)} -> {getattr(et, k)}"
                                                            for k in diff))
            lane.update(et, kcfg, budget, spool_cfg)
            lane.ring.schemas = schemas.get(name) if schemas is not None else None
        changes += _schema_changes(old_schemas, schemas)
        deadline = time.monotonic() + server_cfg.drain_timeout_ms / 1000
        for name in [n for n in self.lanes if n not in types]:
            lane = self.lanes.pop(name)
            self._by_name.pop(lane.ring.name_bytes, None)
            self._splitter.remove(name)
            task = asyncio.get_running_loop().create_task(self._retire(lane, deadline))
            self._retiring.append((lane, task))
            changes.append(f"removed type {name}")
        return changes

    async def _retire(self, lane: Lane, deadline: float) -> None:
        try:
            await lane.retire(deadline)
        finally:
            self._retiring = [(ln, t) for ln, t in self._retiring if ln is not lane]


def _schema_changes(old: SchemaRegistry | None, new: SchemaRegistry | None) -> list[str]:
    """What a reload changed in the types' schemas, for the log."""
    before = {n: set(ts.versions) for n, ts in (old.types.items() if old is not None else ())}
    after = {n: set(ts.versions) for n, ts in (new.types.items() if new is not None else ())}
    out = []
    for name in sorted(before.keys() | after.keys()):
        added = sorted(after.get(name, set()) - before.get(name, set()))
        removed = sorted(before.get(name, set()) - after.get(name, set()))
        if name not in after:
            out.append(f"type {name}: no schema any more")
            continue
        if added:
            out.append(f"type {name}: schema " + ", ".join(f"v{v}" for v in added) + " added")
        if removed:
            out.append(f"type {name}: schema " + ", ".join(f"v{v}" for v in removed) + " removed (producers naming "
                       "it get unknown_schema_version)")
    return out
