"""The forwarder: one type's spool delivered to Kafka, in order, from its checkpoint.

``Forwarder`` reads the log in order from its checkpoint, builds record
batches for the topic's current partitions (the spool holds
partition-independent ring entries), and sends them through its
``TopicWriter``, one record in flight, retrying each until Kafka takes it.
The checkpoint moves over the delivered prefix only and is written at most
every 200 ms, so after a crash at most that much is delivered twice (the ids
let consumers drop those duplicates). On startup the forwarder begins at the
checkpoint: what an earlier run spooled goes out before anything new of that
type. A record Kafka refuses for good goes to the type's dead-letter
directory, so the records behind it are not held forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from eventbroker import _fastpath as fp
from eventbroker.config import EventType, KafkaConfig
from eventbroker.kafka.errors import ProduceFailed
from eventbroker.kafka.sink import KafkaBatch, Sink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.kafka.writer import TopicWriter, WriterStats, drain_until
from eventbroker.spool.log import Position, SpoolLog, encode_record, write_dead_letter

log = logging.getLogger("eventbroker.spool")

_COMMIT_EVERY_S = 0.2
_HUGE = 1 << 60


class ForwarderStats(WriterStats):
    __slots__ = ("events_forwarded", "corrupt_records", "corrupt_bytes_skipped", "dead_lettered_events")

    def __init__(self) -> None:
        super().__init__()
        self.dead_lettered_events = 0
        self.events_forwarded = 0
        self.corrupt_records = 0
        self.corrupt_bytes_skipped = 0


class _Item:
    __slots__ = ("start", "end", "n_events", "done", "batches")

    def __init__(self, start: Position, end: Position, n_events: int,
                 batches: list[KafkaBatch] | None = None) -> None:
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
        self.stats = ForwarderStats()
        self.writer = TopicWriter(etype, sink, kcfg, requests or PrioritySlots(kcfg.max_inflight_requests),
                                  self.stats, log, "the spool keeps the events and retries", spool_forwarder=True)
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
        self.stopping = False
        self.position = spool.checkpoint  # the next record to read
        self.delivered = spool.checkpoint  # everything before it is in Kafka

    @property
    def etype(self) -> EventType:
        return self.writer.etype

    @property
    def backlog_bytes(self) -> int:
        """Spooled bytes not yet delivered."""
        return self.spool.bytes_after(self.delivered)

    def update(self, etype: EventType, kcfg: KafkaConfig) -> None:
        """A reload (same topic): new priority, batch size and back-off."""
        self.writer.etype = etype
        self.writer.kcfg = kcfg

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"forwarder:{self.etype.name}")

    async def stop(self, deadline: float) -> None:
        """Deliver until caught up or ``deadline`` (monotonic), then stop and save the checkpoint."""
        await drain_until(lambda: not self.backlog_bytes, deadline, self._wakeup.set)
        self.stopping = True
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
        while not self.stopping:
            try:
                await self._forward()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("type %s: spool forwarder failed; retrying", self.etype.name)
                await asyncio.sleep(self.writer.first_backoff_s())

    async def _forward(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            max_read = 4 * self.writer.kcfg.batch_max_bytes
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
        writer = self.writer
        if not await writer.ensure_partitions(lambda _e: self.stopping):
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
        built = writer.take_unit(self._scratch, _HUGE)
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
        await writer.take_request_slot(self._slots)
        item = _Item(start, end, n_events, batches)
        self._inflight.append(item)
        writer.launch(self._deliver(item), self._slots, self._sends)

    async def _deliver(self, item: _Item) -> None:
        """One send. A failure is not retried here: ``_recover`` resends
        failed records one at a time, in log order, before anything newer."""
        assert item.batches is not None
        try:
            await self.writer.send(item.batches)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed.append(item)
            self.writer.send_failed(e)
            self._wakeup.set()
            return
        self._delivered(item)

    async def _recover(self) -> None:
        """Let every pipelined send finish, then resend the failed ones in order."""
        while self._sends:
            await asyncio.gather(*list(self._sends), return_exceptions=True)
        failed = sorted(self._failed, key=lambda it: it.end)
        self._failed.clear()
        for item in failed:
            assert item.batches is not None
            refused = await self.writer.send_retrying(item.batches, lambda e: e.record_refused,
                                                      slot_per_attempt=True, backoff_first=True)
            if refused is not None:
                await self._dead_letter(item, refused)
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
                self.writer.failed(f"cannot write the dead-letter file: {err}", count=False)
                await asyncio.sleep(self.writer.kcfg.retry_backoff_max_ms / 1000)
        self.stats.dead_lettered_events += item.n_events
        item.n_events = 0  # not forwarded
        log.error("type %s: Kafka refuses a spooled record of topic %s for good (%s); its events are kept in "
                  "%s and the spool goes on", self.etype.name, self.etype.topic, e, path)

    def _delivered(self, item: _Item) -> None:
        if self.writer.recovered():
            log.info("type %s: delivering from the spool again", self.etype.name)
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
                self.writer.failed(f"cannot save the spool checkpoint: {e}", count=False)
