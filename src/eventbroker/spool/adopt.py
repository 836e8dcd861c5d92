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
import logging
import os
from collections.abc import Callable
from pathlib import Path

from eventbroker.config import EventType, KafkaConfig, TypeDefaults
from eventbroker.errors import SpoolError
from eventbroker.kafka.sink import Sink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.spool.forwarder import Forwarder
from eventbroker.spool.layout import lock_slot, read_meta, slots, type_dirs
from eventbroker.spool.log import SpoolLog

log = logging.getLogger("eventbroker.spool")

_STALL_S = 60.0


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
        for d in [self.base, *slots(self.base)]:
            if d == own:  # ours: only types we no longer have a lane for
                for t in type_dirs(d):
                    if t.name not in self.configured():
                        await self._deliver(t)
                continue
            if d == self.base:  # the single-process layout: locked per type
                for t in type_dirs(d):
                    await self._deliver(t)
                continue
            fd = lock_slot(d)  # another worker's slot: only when no one holds it
            if fd is None:
                continue
            try:
                for t in type_dirs(d):
                    await self._deliver(t)
            finally:
                os.close(fd)

    async def _deliver(self, type_dir: Path) -> None:
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
