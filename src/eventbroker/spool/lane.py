"""Types with ``ack = "spool"``: ring -> disk spool -> (forwarder) -> Kafka.

``SpoolLane`` is a gateway lane that takes other units and acknowledges at
another moment: it drains the type's ring into its ``SpoolLog`` in groups of
records (one write, one fsync with ``fsync = "always"``) and acknowledges the
producers when the write is done, so a Kafka outage never reaches them. When
the spool cannot take more (its size limit, a full disk, an I/O error) the
lane sheds like a Kafka-acked lane does: it answers retry-later and probes
until there is room again. A failed write is cut back, so no batch is
half-acked. Its ``Forwarder`` delivers the spool to Kafka.

``SpoolLanes`` is the router's lane factory when the gateway has a spool:
it opens each spooled type's log under the spool root (a worker's slot)
and makes plain lanes for the other types.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eventbroker.config import EventType, KafkaConfig, SpoolConfig
from eventbroker.errors import SpoolWriteFailed
from eventbroker.gateway.lane import Lane, LaneSnapshot, SpoolSnapshot, Unit
from eventbroker.kafka.sink import Sink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.protocol import Reason
from eventbroker.spool.forwarder import Forwarder
from eventbroker.spool.layout import write_meta
from eventbroker.spool.log import SpoolLog, record_prefix

log = logging.getLogger("eventbroker.spool")


class SpoolLane(Lane):
    """A type acknowledged once its events are in the local disk spool."""

    def __init__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots,
                 scfg: SpoolConfig, spool: SpoolLog) -> None:
        super().__init__(etype, sink, kcfg, requests)
        self.spool = spool
        self._scfg = scfg
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"spool-write:{etype.name}")
        self.forwarder = Forwarder(spool, etype, sink, kcfg, requests)
        self._syncer: asyncio.Task[None] | None = None
        self._closed = False
        self._finishing = False
        self._last_room_check = 0.0
        self.shed_reason = Reason.SPOOL_UNAVAILABLE

    @property
    def acks_without_kafka(self) -> bool:
        return True

    @property
    def holds_spool(self) -> bool:
        return True

    def snapshot(self) -> LaneSnapshot:
        fwd, ss = self.forwarder, self.spool.stats
        base = super().snapshot()
        return base._replace(
            send_failures=base.send_failures + fwd.stats.send_failures,
            batch_bytes=base.batch_bytes + fwd.stats.batch_bytes,
            compressed_bytes=base.compressed_bytes + fwd.stats.compressed_bytes,
            spool=SpoolSnapshot(fwd.backlog_bytes, fwd.stats.events_forwarded, ss.write_failures,
                                ss.torn_bytes_truncated + ss.corrupt_bytes_skipped + fwd.stats.corrupt_bytes_skipped))

    def set_histograms(self, produce_seconds, ack_seconds) -> None:
        super().set_histograms(produce_seconds, ack_seconds)
        self.forwarder.writer.produce_seconds = produce_seconds

    def update(self, etype: EventType, kcfg: KafkaConfig, budget_limit_bytes: int, spool_cfg: SpoolConfig) -> None:
        """A reload may also change the spool's size limits (the rest needs a restart)."""
        super().update(etype, kcfg, budget_limit_bytes, spool_cfg)
        self._scfg = spool_cfg
        self.forwarder.update(etype, kcfg)

    def can_come_back(self, etype: EventType) -> bool:
        return etype.ack == self.etype.ack and etype.topic == self.etype.topic and not self._finishing

    def abandon(self) -> None:
        self.spool.close()
        self._io.shutdown(wait=False)

    async def retire(self, deadline: float) -> None:
        """The type was removed from the config: it takes no more events, but
        what its spool holds (acknowledged) is still delivered, however long
        that takes, unless the daemon stops first; then the spool is closed."""
        await self._drain_ring(deadline)  # what the ring holds goes to the spool first
        if not self.idle:
            self.shed("its type was removed from the config")
        while self.forwarder.backlog_bytes and not self.forwarder.stopping:  # noqa: ASYNC110 - rare, 5/s
            await asyncio.sleep(0.2)
        self._finishing = True  # from here on a reload cannot bring it back
        await self.stop(time.monotonic())

    def start(self) -> None:
        super().start()
        self.forwarder.start()
        if self._scfg.fsync == "interval":
            self._syncer = asyncio.get_running_loop().create_task(self._sync_every(self._scfg.fsync_interval_ms / 1000))

    async def stop(self, deadline: float) -> None:
        # Spool what the ring holds (acking it), deliver what we can, then stop.
        if self._closed:
            return
        self._closed = True
        await self._drain_ring(deadline)
        await self.forwarder.stop(deadline)
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        await super().stop(deadline)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self.spool.close)
        self._io.shutdown(wait=True)

    async def _sync_every(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            try:
                await loop.run_in_executor(self._io, self.spool.sync)
            except OSError as e:
                log.error("type %s: fsync of the spool failed: %s", self.etype.name, e)

    def _stalled(self, seconds: float) -> str:
        # Its units wait for the disk, not Kafka: a write that takes longer
        # than stall_timeout_ms (a hung disk) hands the type's events back.
        return f"a write to the spool has taken {seconds:.1f}s"

    def _room_problem(self) -> str:
        if self.spool.broken:
            return self.spool.broken
        pending = self.spool.pending_bytes
        if pending >= self._scfg.max_bytes_per_type:
            return (f"spool holds {pending} undelivered bytes, its limit "
                    f"(spool.max_bytes_per_type = {self._scfg.max_bytes_per_type})")
        try:
            st = os.statvfs(self.spool.directory)
        except OSError as e:
            return f"cannot stat the spool directory: {e}"
        free = st.f_bavail * st.f_frsize
        if free < self._scfg.min_free_bytes:
            return f"disk under the spool has {free} bytes free (spool.min_free_bytes = {self._scfg.min_free_bytes})"
        return ""

    async def _drain_step(self) -> None:
        """Write the next group of records (one write, one fsync with fsync =
        "always") and acknowledge their events."""
        ring = self.ring
        max_unit = self._kcfg.batch_max_bytes  # a reload may change it
        group_bytes = 4 * max_unit
        now = time.monotonic()
        if now - self._last_room_check > 0.1:
            self._last_room_check = now
            why = self._room_problem()
            if why:
                self.shed(why)
                return
        units: list[Unit] = []
        pieces: list[bytes] = []
        size = 0
        while size < group_bytes:
            r = ring.take_entries(max_unit)
            if r is None:
                break
            entries, n_events, n_bytes, end_seq, end_off = r
            unit = Unit([], n_events, n_bytes, end_seq, end_off)
            self._attribute(unit)
            self._units.append(unit)
            units.append(unit)
            pieces.append(record_prefix(n_events, entries))
            pieces.append(entries)
            size += n_bytes
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self.spool.append, pieces, len(units))
        except SpoolWriteFailed as e:
            self.writer.failed(f"spool write failed: {e}")
            self.shed(f"cannot write the spool: {e}")
            return
        self.spool.stats.events_written += sum(u.n_events for u in units)
        for unit in units:
            self._finish(unit)
        self.forwarder.wake()

    def _probe_passed(self) -> str:
        return "the spool has room again"

    async def _probe_problem(self) -> str:
        return self._room_problem()


class SpoolLanes:
    """The router's lane factory for a gateway with a spool: a ``SpoolLane``
    (its log opened under ``root``) for each ``ack = "spool"`` type, a plain
    ``Lane`` for the others. ``root`` is given, or taken from ``root_provider``
    (a worker's slot) when the first spooled type needs it."""

    def __init__(self, cfg: SpoolConfig, root: Path | None = None,
                 root_provider: Callable[[], Path] | None = None) -> None:
        self.cfg = cfg
        self.root = root
        self._root_provider = root_provider or cfg.resolved_dir

    def __call__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots) -> Lane:
        if etype.ack != "spool":
            return Lane(etype, sink, kcfg, requests)
        if self.root is None:
            self.root = self._root_provider()
        directory = self.root / etype.name
        cfg = self.cfg
        spool = SpoolLog(directory, segment_bytes=cfg.segment_bytes, fsync=cfg.fsync, name=etype.name)
        spool.open()
        try:
            write_meta(directory, etype)
        except BaseException:
            spool.close()
            raise
        log.info("type %s: acknowledged once in the disk spool %s (fsync %s)", etype.name, directory, cfg.fsync)
        return SpoolLane(etype, sink, kcfg, requests, cfg, spool)

