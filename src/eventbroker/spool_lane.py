"""Types with ``ack = "spool"``: ring -> disk spool -> (forwarder) -> Kafka.

``SpoolLane`` drains the type's ring into its ``SpoolLog`` in groups of
records (one write, one fsync with ``fsync = "always"``) and acknowledges the
producers when the write is done: a Kafka outage never reaches them. When the
spool cannot take more (its size limit, a full disk, an I/O error) the lane
sheds like a Kafka-acked lane does: it answers retry-later and probes until
there is room again. A failed write is cut back, so no batch is half-acked.

``Forwarder`` reads the log in order from its checkpoint, builds record
batches for the topic's current partitions (the spool holds
partition-independent ring entries), and sends them with up to
``max_inflight_batches_per_type`` in flight, retrying each until Kafka takes
it. The checkpoint moves over the delivered prefix only and is written at
most every 200 ms, so after a crash at most that much is delivered twice
(the ids let consumers drop those duplicates). On startup the forwarder
begins at the checkpoint: what an earlier run spooled goes out before
anything new of that type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_ORDER, EventType, KafkaConfig, ServerConfig, SpoolConfig
from eventbroker.protocol import Reason
from eventbroker.router import Lane, LaneState, PrioritySlots, Unit
from eventbroker.sinks import ProduceFailed, Sink
from eventbroker.spool import (
    Position,
    SpoolLog,
    SpoolWriteFailed,
    encode_record,
    record_prefix,
    write_dead_letter,
)

log = logging.getLogger("eventbroker.spool")

_COMMIT_EVERY_S = 0.2
_HUGE = 1 << 60


class ForwarderStats:
    __slots__ = ("events_forwarded", "send_failures", "corrupt_records",
                 "corrupt_bytes_skipped", "dead_lettered_events", "last_error")

    def __init__(self) -> None:
        self.dead_lettered_events = 0
        self.events_forwarded = 0
        self.send_failures = 0
        self.corrupt_records = 0
        self.corrupt_bytes_skipped = 0
        self.last_error = ""


# Kafka errors no retry of the same record can fix: corrupt message, message
# too large, record list too large, invalid record. Such a record goes to the
# type's dead-letter directory so the records behind it are not held forever.
_PERMANENT_CODES = frozenset({2, 10, 18, 87})


class _Item:
    __slots__ = ("start", "end", "n_events", "done", "batches")

    def __init__(self, start: Position, end: Position, n_events: int,
                 batches: list[tuple[int, bytes, int]] | None = None) -> None:
        self.start = start
        self.end = end
        self.n_events = n_events
        self.done = False
        self.batches = batches


class Forwarder:
    """Delivers one type's spool to Kafka, in order, from its checkpoint."""

    def __init__(self, spool: SpoolLog, etype: EventType, sink: Sink, kcfg: KafkaConfig,
                 requests: PrioritySlots | None = None) -> None:
        self.spool = spool
        self.etype = etype
        self.sink = sink
        self._kcfg = kcfg
        self._requests = requests or PrioritySlots(kcfg.max_inflight_requests)
        self._rank = PRIORITY_ORDER[etype.priority]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"spool-read:{etype.name}")
        self._scratch = fp.TypeRing(etype.name, capacity_bytes=_HUGE, max_event_bytes=etype.max_event_bytes,
                                    by_key=etype.partitioning == "key")
        # One record in flight: a failed record is resent before anything
        # after it goes out, so the spool reaches Kafka strictly in order.
        self._slots = asyncio.Semaphore(1)
        self._wakeup = asyncio.Event()
        self._inflight: deque[_Item] = deque()  # sent or being sent, in log order
        self._failed: list[_Item] = []  # their sends failed: resent in order by _recover
        self._sends: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._partitions = 0
        self._sticky = 0
        self._last_log = 0.0
        self.position = spool.checkpoint  # the next record to read
        self.delivered = spool.checkpoint  # everything before it is in Kafka
        self.stats = ForwarderStats()
        self.produce_seconds = None  # a histogram child (metrics.py), when metrics are on

    @property
    def backlog_bytes(self) -> int:
        """Spooled bytes not yet delivered."""
        return self.spool.bytes_after(self.delivered)

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"forwarder:{self.etype.name}")

    async def stop(self, deadline: float) -> None:
        """Deliver until caught up or ``deadline`` (monotonic), then stop and save the checkpoint."""
        while self.backlog_bytes and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self._stopping = True
        tasks = [t for t in (self._task, self._commit_task) if t is not None]
        for t in tasks + list(self._sends):
            t.cancel()
        await asyncio.gather(*tasks, *self._sends, return_exceptions=True)
        loop = asyncio.get_running_loop()
        try:
            if self.delivered != self.spool.checkpoint:
                await loop.run_in_executor(self._reader, self.spool.commit, self.delivered)
        except OSError as e:
            log.error("type %s: cannot save the spool checkpoint: %s", self.etype.name, e)
        finally:
            self._reader.shutdown(wait=False)
        left = self.backlog_bytes
        if left:
            log.warning("type %s: %d spooled bytes not yet in Kafka; they go out when the daemon starts again",
                        self.etype.name, left)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._forward()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("type %s: spool forwarder failed; retrying", self.etype.name)
                await asyncio.sleep(self._kcfg.retry_backoff_ms / 1000)

    async def _forward(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            max_read = 4 * self._kcfg.batch_max_bytes
            self._wakeup.clear()
            if self._failed:
                await self._recover()
                continue
            records, corrupt = await loop.run_in_executor(self._reader, self.spool.read, self.position, max_read)
            for rec in records:
                await self._send_record(rec.n_events, rec.entries, self.position, rec.end)
            if corrupt is not None:
                self.stats.corrupt_records += 1
                self.stats.corrupt_bytes_skipped += corrupt.skipped_bytes
                log.error("type %s: spool record at %s is damaged (%s); skipping %d bytes to %s",
                          self.etype.name, corrupt.at, corrupt.reason, corrupt.skipped_bytes, corrupt.resume)
                self._skip_to(corrupt.resume)
            elif not records:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 1.0)

    def _skip_to(self, pos: Position) -> None:
        item = _Item(pos, pos, 0)
        item.done = True
        self._inflight.append(item)
        self.position = pos
        self._advance()

    async def _send_record(self, n_events: int, entries: memoryview, start: Position, end: Position) -> None:
        batches: list[tuple[int, bytes, int]] = []
        if self.sink.builds_batches:
            while self._partitions == 0:
                try:
                    self._partitions = await self.sink.partitions(self.etype.topic)
                except Exception as e:
                    self._note(f"metadata for {self.etype.topic}: {e!r}")
                    await asyncio.sleep(self._kcfg.retry_backoff_ms / 1000)
                    if self._stopping:
                        return
            try:
                self._scratch.append_entries(entries)
            except ValueError as e:
                self.stats.corrupt_records += 1
                self.stats.corrupt_bytes_skipped += len(entries)
                log.error("type %s: spool record before %s does not hold valid entries (%s); skipped",
                          self.etype.name, end, e)
                self._skip_to(end)
                return
            self._sticky = (self._sticky + 1) % self._partitions
            built = self._scratch.build_unit(_HUGE, self._partitions, self._sticky)
            if built is None:  # a record of zero events
                self._skip_to(end)
                return
            batches, _, n_bytes, end_seq, end_off = built
            self._scratch.release(n_bytes, end_seq, end_off)
        self.position = end
        await self._slots.acquire()
        while self._failed:  # a send failed meanwhile: nothing newer goes out before it
            self._slots.release()
            await self._recover()
            await self._slots.acquire()
        try:
            await self._requests.acquire(self._rank)
        except BaseException:
            self._slots.release()
            raise
        item = _Item(start, end, n_events, batches)
        self._inflight.append(item)
        t = asyncio.get_running_loop().create_task(self._deliver(item))
        self._sends.add(t)
        t.add_done_callback(self._send_done)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._slots.release()
        self._requests.release()

    async def _deliver(self, item: _Item) -> None:
        """One send. A failure is not retried here: ``_recover`` resends
        failed records one at a time, in log order, before anything newer."""
        try:
            await self._send(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed.append(item)
            self._send_failed(e)
            self._wakeup.set()
            return
        self._delivered(item)

    async def _send(self, item: _Item) -> None:
        if item.batches:
            t0 = time.monotonic()
            await self.sink.send(self.etype.topic, item.batches)
            if self.produce_seconds is not None:
                self.produce_seconds.observe(time.monotonic() - t0)

    def _send_failed(self, e: Exception) -> None:
        self.stats.send_failures += 1
        self._partitions = 0  # the topic may have changed: look it up again
        self._note(f"produce to {self.etype.topic} failed: {e!r}")

    async def _recover(self) -> None:
        """Let every pipelined send finish, then resend the failed ones in order."""
        while self._sends:
            await asyncio.gather(*list(self._sends), return_exceptions=True)
        failed = sorted(self._failed, key=lambda it: it.end)
        self._failed.clear()
        backoff = self._kcfg.retry_backoff_ms / 1000
        for item in failed:
            while True:
                await asyncio.sleep(backoff)
                await self._requests.acquire(self._rank)
                try:
                    await self._send(item)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._send_failed(e)
                    if isinstance(e, ProduceFailed) and e.codes and set(e.codes.values()) <= _PERMANENT_CODES:
                        await self._dead_letter(item, e)
                        break
                    backoff = min(backoff * 2, self._kcfg.retry_backoff_max_ms / 1000)
                finally:
                    self._requests.release()
            self._delivered(item)

    async def _dead_letter(self, item: _Item, e: ProduceFailed) -> None:
        """Kafka refuses this record for good: keep it in dead-letter/, go on with the rest."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                recs, _ = await loop.run_in_executor(self._reader, self.spool.read, item.start, 1)
                record = encode_record(recs[0].n_events, bytes(recs[0].entries))
                path = await loop.run_in_executor(self._reader, write_dead_letter, self.spool.directory,
                                                  item.start, record)
                break
            except OSError as err:
                self._note(f"cannot write the dead-letter file: {err}")
                await asyncio.sleep(self._kcfg.retry_backoff_max_ms / 1000)
        self.stats.dead_lettered_events += item.n_events
        item.n_events = 0  # not forwarded
        log.error("type %s: Kafka refuses a spooled record of topic %s for good (%s); its events are kept in "
                  "%s and the spool goes on", self.etype.name, self.etype.topic, e, path)

    def _delivered(self, item: _Item) -> None:
        if self.stats.last_error:
            log.info("type %s: delivering from the spool again", self.etype.name)
            self.stats.last_error = ""
        item.done = True
        item.batches = None
        self.stats.events_forwarded += item.n_events
        self._advance()

    def _advance(self) -> None:
        moved = False
        while self._inflight and self._inflight[0].done:
            self.delivered = self._inflight.popleft().end
            moved = True
        if moved and (self._commit_task is None or self._commit_task.done()):
            self._commit_task = asyncio.get_running_loop().create_task(self._commit_later())

    async def _commit_later(self) -> None:
        loop = asyncio.get_running_loop()
        while self.delivered != self.spool.checkpoint:  # deliveries during a commit are committed next
            await asyncio.sleep(_COMMIT_EVERY_S)
            try:
                await loop.run_in_executor(self._reader, self.spool.commit, self.delivered)
            except OSError as e:
                self._note(f"cannot save the spool checkpoint: {e}")

    def _note(self, what: str) -> None:
        now = time.monotonic()
        if what != self.stats.last_error or now - self._last_log > 10:
            log.warning("type %s: %s; the spool keeps the events and retries", self.etype.name, what)
            self._last_log = now
        self.stats.last_error = what


class SpoolLane(Lane):
    """A type acknowledged once its events are in the local disk spool."""

    def __init__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, server_cfg: ServerConfig,
                 requests: PrioritySlots | None, scfg: SpoolConfig, spool: SpoolLog) -> None:
        super().__init__(etype, sink, kcfg, server_cfg, requests)
        self.spool = spool
        self._scfg = scfg
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"spool-write:{etype.name}")
        self.forwarder = Forwarder(spool, etype, sink, kcfg, self._requests)
        self._syncer: asyncio.Task[None] | None = None
        self._closed = False
        self.finishing = False
        self.shed_reason = Reason.SPOOL_UNAVAILABLE

    def update_spool(self, scfg: SpoolConfig) -> None:
        """A reload may change the size limits (the rest needs a restart)."""
        self._scfg = scfg
        self.forwarder._kcfg = self._kcfg

    async def retire(self, deadline: float) -> None:
        """The type was removed from the config: it takes no more events, but
        what its spool holds (acknowledged) is still delivered, however long
        that takes, unless the daemon stops first; then the spool is closed."""
        while not self.idle and time.monotonic() < deadline and self.state is not LaneState.OPEN:
            self._wakeup.set()  # what the ring holds goes to the spool first
            await asyncio.sleep(0.01)
        if not self.idle:
            self.shed("its type was removed from the config")
        while self.forwarder.backlog_bytes and not self.forwarder._stopping:  # noqa: ASYNC110 - rare, 5/s
            await asyncio.sleep(0.2)
        self.finishing = True  # from here on a reload cannot bring it back
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
        while not self.idle and time.monotonic() < deadline and self.state is not LaneState.OPEN:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        await self.forwarder.stop(deadline)
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        await super().stop(deadline)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.spool.close)
        self._writer.shutdown(wait=True)

    async def _sync_every(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            try:
                await loop.run_in_executor(self._writer, self.spool.sync)
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

    async def _drain(self) -> None:
        ring = self.ring
        loop = asyncio.get_running_loop()
        last_room_check = 0.0
        while not self._stopping:
            max_unit = self._kcfg.batch_max_bytes  # a reload may change it
            group_bytes = 4 * max_unit
            if self.state is LaneState.OPEN:
                await self._probe()
                continue
            if ring.pending_events == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            if now - last_room_check > 0.1:
                last_room_check = now
                why = self._room_problem()
                if why:
                    self.shed(why)
                    continue
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
                await loop.run_in_executor(self._writer, self.spool.append, pieces, len(units))
            except SpoolWriteFailed as e:
                self._note_failure(f"spool write failed: {e}")
                self.shed(f"cannot write the spool: {e}")
                continue
            self.spool.stats.events_written += sum(u.n_events for u in units)
            for unit in units:
                self._finish(unit)
            self.forwarder.wake()

    async def _probe(self) -> None:
        await asyncio.sleep(self._shed_backoff_s)
        why = self._room_problem()
        if why:
            self._note_failure(why)
            self._shed_backoff_s = self._next_backoff(self._shed_backoff_s)
            return
        log.info("type %s: the spool has room again; accepting events", self.etype.name)
        self.state = LaneState.HALF_OPEN
        self.ring.accepting = True
