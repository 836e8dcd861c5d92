"""Deliver spools that no lane owns any more.

Acknowledged events can be left in a spool directory nobody writes to: the
slot of a worker generation that was replaced while Kafka was down, a type
removed from the config, the single-process layout after a switch to
``--workers`` (or back). Every daemon looks for such directories every few
seconds; one whose lock it can take and that holds undelivered records is
delivered by a ``Forwarder`` (in order, from its checkpoint), then released.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

import orjson

from eventbroker.config import EventType, KafkaConfig, TypeDefaults
from eventbroker.router import PrioritySlots
from eventbroker.sinks import Sink
from eventbroker.spool import SpoolError, SpoolLog, list_segments

log = logging.getLogger("eventbroker.spool")

META_FILE = "type.json"
_STALL_S = 60.0
SLOT_LOCK = "slot.lock"


def write_meta(type_dir: Path, et: EventType) -> None:
    """Remember the type's topic beside its spool, for whoever delivers it later."""
    data = orjson.dumps({"name": et.name, "topic": et.topic, "partitioning": et.partitioning,
                         "priority": et.priority, "max_event_bytes": et.max_event_bytes})
    tmp = type_dir / (META_FILE + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, type_dir / META_FILE)


def read_meta(type_dir: Path, defaults: TypeDefaults, known: dict[str, EventType] | None = None) -> EventType | None:
    """The type a spool belongs to: from its type.json, else from the config;
    None when neither says (its topic would be a guess)."""
    try:
        m = orjson.loads((type_dir / META_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        if known and type_dir.name in known:
            return known[type_dir.name]
        return None
    return EventType(name=type_dir.name, topic=m.get("topic", f"events.{type_dir.name}"),
                     priority=m.get("priority", defaults.priority),
                     max_event_bytes=m.get("max_event_bytes", defaults.max_event_bytes),
                     partitioning=m.get("partitioning", defaults.partitioning),
                     ring_bytes=defaults.ring_bytes, enabled=True, ack="spool")


def lock_slot(slot: Path) -> int | None:
    """Hold ``slot`` (a worker's spool directory) for this process; None if taken."""
    slot.mkdir(parents=True, exist_ok=True)
    fd = os.open(slot / SLOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _type_dirs(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir()
                  if p.is_dir() and not p.name.startswith("slot-") and ((p / "lock").exists() or list_segments(p)))


class SpoolAdopter:
    def __init__(self, base: Path, own_root, configured, sink: Sink, kcfg: KafkaConfig, defaults: TypeDefaults,
                 requests: PrioritySlots, segment_bytes: int, fsync: str, known=None) -> None:
        self.base = base
        self.own_root = own_root  # () -> Path | None: this process's spool root, if it has one
        self.configured = configured  # () -> names of this process's spooled lanes (they own their spools)
        # () -> the configured types, for spools without type.json
        self.known: Callable[[], dict[str, EventType]] = known or dict
        self.sink = sink
        self.kcfg = kcfg
        self.defaults = defaults
        self.requests = requests
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._warned: set[Path] = set()

    async def run(self, every_s: float = 5.0) -> None:
        await asyncio.sleep(1.0)
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("looking for unowned spools failed")
            await asyncio.sleep(every_s)

    async def sweep(self) -> None:
        if not self.base.is_dir():
            return
        own = self.own_root()
        for d in [self.base, *sorted(self.base.glob("slot-*"))]:
            if d == own:  # ours: only types we no longer have a lane for
                for t in _type_dirs(d):
                    if t.name not in self.configured():
                        await self._deliver(t)
                continue
            if d == self.base:  # the single-process layout: locked per type
                for t in _type_dirs(d):
                    await self._deliver(t)
                continue
            fd = lock_slot(d)  # another worker's slot: only when no one holds it
            if fd is None:
                continue
            try:
                for t in _type_dirs(d):
                    await self._deliver(t)
            finally:
                os.close(fd)

    async def _deliver(self, type_dir: Path) -> None:
        from eventbroker.spool_lane import Forwarder

        log_ = SpoolLog(type_dir, segment_bytes=self.segment_bytes, fsync=self.fsync, name=type_dir.name)
        try:
            log_.open()
        except SpoolError:
            return  # in use by a lane, or unreadable (spool check tells which)
        try:
            if not log_.pending_bytes:
                return
            et = read_meta(type_dir, self.defaults, self.known())
            if et is None:
                if type_dir not in self._warned:
                    self._warned.add(type_dir)
                    log.error("unowned spool %s holds %d undelivered bytes but its topic is unknown (no type.json, "
                              "type not in the config): add the type to the config or run "
                              "`eventbroker spool replay`", type_dir, log_.pending_bytes)
                return
            log.warning("type %s: delivering %d bytes from an unowned spool %s to %s", et.name,
                        log_.pending_bytes, type_dir, et.topic)
            f = Forwarder(log_, et, self.sink, self.kcfg, self.requests)
            f.start()
            try:
                # Give up for this sweep when nothing moves for a minute (Kafka
                # away): the next sweep tries again, other spools get a turn.
                last, still_since = f.backlog_bytes, asyncio.get_running_loop().time()
                while f.backlog_bytes:
                    await asyncio.sleep(0.2)
                    now = asyncio.get_running_loop().time()
                    if f.backlog_bytes != last:
                        last, still_since = f.backlog_bytes, now
                    elif now - still_since > _STALL_S:
                        log.warning("type %s: unowned spool %s is not moving; trying again later", et.name, type_dir)
                        break
            finally:
                await f.stop(0.0)
            log.info("type %s: unowned spool %s delivered (%d events)", et.name, type_dir, f.stats.events_forwarded)
        finally:
            with contextlib.suppress(OSError):
                log_.close()
