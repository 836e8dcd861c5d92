"""One type's way into its topic: the delivery machinery every writer shares.

A gateway lane (ring -> Kafka) and the spool's forwarder (spool -> Kafka)
each own a ``TopicWriter``. It knows the topic's partitions (looked up
again after a failure), picks the sticky partition for unkeyed events, takes
units from a ring in the sink's form, sends them timed under the shared
produce-request slots, backs off exponentially, and logs failures at a
bounded rate. What a writer's owner does with a failure (hand the events
back, keep them spooled, dead-letter a record) stays with the owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_ORDER, EventType, KafkaConfig
from eventbroker.kafka.compression import BatchCompressor, compressor_for
from eventbroker.kafka.errors import ProduceFailed
from eventbroker.kafka.sink import KafkaBatch, Sink, UnitTaken
from eventbroker.kafka.slots import PrioritySlots

# A failure is logged when it differs from the last one (at most once a
# second), and a persisting one every ten seconds.
_LOG_CHANGED_EVERY_S = 1.0
_LOG_SAME_EVERY_S = 10.0


class WriterStats:
    """Counters a writer keeps for its owner (the owner's stats extend it)."""

    __slots__ = ("send_failures", "last_error", "batch_bytes", "compressed_bytes")

    def __init__(self) -> None:
        self.send_failures = 0
        self.last_error = ""
        self.batch_bytes = 0  # record batches built, uncompressed
        self.compressed_bytes = 0  # the same batches as sent (compressed, or not when compression = "none")


class TopicWriter:
    def __init__(self, etype: EventType, sink: Sink, kcfg: KafkaConfig, requests: PrioritySlots,
                 stats: WriterStats, log: logging.Logger, retry_note: str = "retrying", *,
                 spool_forwarder: bool = False) -> None:
        """``spool_forwarder``: the spool's forwarder builds batches per record
        and looks the partitions up again after a failed send, and counts only
        failed sends in ``stats.send_failures``; a lane keeps the partition
        count until it sheds (a brief metadata gap while a send is retried must
        not make it give the type up) and counts failed metadata look-ups too."""
        self.etype = etype
        self.sink = sink
        self.kcfg = kcfg  # a reload may replace it
        self.requests = requests
        self.stats = stats
        self.partitions = 0  # 0: look them up before the next unit
        self.metadata_failing_since = 0.0
        self.produce_seconds = None  # a histogram child (ops/metrics.py), when metrics are on
        self._sticky = 0
        self._log = log
        self._retry_note = retry_note
        self._recheck = spool_forwarder
        self._count_metadata = not spool_forwarder
        self._last_log = 0.0
        self._codec: tuple[str, int] = ("none", 0)
        self._compressor: BatchCompressor | None = None

    @property
    def topic(self) -> str:
        return self.etype.topic

    @property
    def rank(self) -> int:
        return PRIORITY_ORDER[self.etype.priority]

    # back-off

    def first_backoff_s(self) -> float:
        return self.kcfg.retry_backoff_ms / 1000

    def next_backoff_s(self, seconds: float) -> float:
        return min(seconds * 2, self.kcfg.retry_backoff_max_ms / 1000)

    # partitions and units

    async def ensure_partitions(self, give_up: Callable[[Exception], bool]) -> bool:
        """Look the topic's partitions up until they are known (True), retrying
        with back-off; after each failure ``give_up(error)`` may end it (False)."""
        while self.partitions == 0:
            try:
                self.partitions = await self.sink.partitions(self.topic)
                self.metadata_failing_since = 0.0
            except Exception as e:  # broker down, topic missing
                self.failed(f"metadata for {self.topic}: {e!r}", count=self._count_metadata)
                if not self.metadata_failing_since:
                    self.metadata_failing_since = time.monotonic()
                if give_up(e):
                    return False
                await asyncio.sleep(self.first_backoff_s())
        return True

    def forget_partitions(self) -> None:
        self.partitions = 0
        self.metadata_failing_since = 0.0

    def take_unit(self, ring: fp.TypeRing, max_bytes: int) -> UnitTaken | None:
        """The ring's next run of entries, in the form the sink sends, each
        record batch compressed with the type's codec; unkeyed events of each
        unit go to the next partition in turn."""
        self._sticky = (self._sticky + 1) % self.partitions
        unit = self.sink.take_unit(ring, max_bytes, self.partitions, self._sticky)
        if unit is None or not unit[0]:
            return unit
        batches = unit[0]
        raw = sum(len(b[1]) for b in batches)
        self.stats.batch_bytes += raw
        et = self.etype
        if self._codec != (et.compression, et.compression_level):  # a reload may change it
            self._codec = (et.compression, et.compression_level)
            self._compressor = compressor_for(et.compression, et.compression_level)
        if self._compressor is None:
            self.stats.compressed_bytes += raw
            return unit
        packed, size = self._compressor.compress(batches)
        self.stats.compressed_bytes += size
        return packed, unit[1], unit[2], unit[3], unit[4]

    # sending

    async def send(self, batches: list[KafkaBatch]) -> None:
        """One produce attempt, timed; acknowledged batches leave ``batches``.

        A batch of dead-letter entries (``fp.DEAD_LETTER_PARTITION``) goes
        first, to partition 0 of the type's dead-letter topic; the unit is
        acknowledged once both topics have their batches."""
        t0 = time.monotonic()
        dead = [b for b in batches if b[0] == fp.DEAD_LETTER_PARTITION]
        if dead:
            await self._send_dead_letters(batches, dead)
        await self.sink.send(self.topic, batches)
        if self.produce_seconds is not None:
            self.produce_seconds.observe(time.monotonic() - t0)

    async def _send_dead_letters(self, batches: list[KafkaBatch], dead: list[KafkaBatch]) -> None:
        topic = self.etype.dead_letter_topic
        await self.sink.partitions(topic)  # known to the client's metadata from now on
        await self.sink.send(topic, [(0, buf, count) for _, buf, count in dead])
        batches[:] = [b for b in batches if b[0] != fp.DEAD_LETTER_PARTITION]

    async def send_retrying(self, batches: list[KafkaBatch], stop_on: Callable[[ProduceFailed], bool], *,
                            slot_per_attempt: bool = False, backoff_first: bool = False) -> ProduceFailed | None:
        """Send until Kafka has every batch (None), backing off exponentially;
        returns the error when ``stop_on`` says no retry can help. With
        ``slot_per_attempt`` each attempt takes a produce-request slot of its
        own (else the caller holds one for the whole delivery); with
        ``backoff_first`` the first attempt waits too (a send already failed)."""
        backoff = self.first_backoff_s()
        while True:
            if backoff_first:
                await asyncio.sleep(backoff)
                backoff = self.next_backoff_s(backoff)
            backoff_first = True
            if slot_per_attempt:
                await self.requests.acquire(self.rank)
            try:
                await self.send(batches)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.send_failed(e)
                if isinstance(e, ProduceFailed) and stop_on(e):
                    return e
            finally:
                if slot_per_attempt:
                    self.requests.release()

    def send_failed(self, e: Exception) -> None:
        if self._recheck:
            self.partitions = 0  # the topic may have changed: look it up again
        self.failed(f"produce to {self.topic} failed: {e!r}")

    # the units in flight

    async def take_request_slot(self, own_slots: asyncio.Semaphore) -> None:
        """The shared produce-request slot, by priority; on failure the owner's
        own (per type) slot, already taken, is given back."""
        try:
            await self.requests.acquire(self.rank)
        except BaseException:
            own_slots.release()
            raise

    def launch(self, coro: Coroutine[Any, Any, None], own_slots: asyncio.Semaphore,
               sends: set[asyncio.Task[None]]) -> None:
        """Run one send holding both slots; they are given back when it ends,
        however it ends (in a done callback: a task cancelled before its first
        step never runs its own finally clause)."""
        task = asyncio.get_running_loop().create_task(coro)
        sends.add(task)

        def done(t: asyncio.Task[None]) -> None:
            sends.discard(t)
            own_slots.release()
            self.requests.release()

        task.add_done_callback(done)

    # failures and recovery

    def failed(self, what: str, count: bool = True) -> None:
        """Log a failure at a bounded rate; ``count`` it as a failed send."""
        stats = self.stats
        if count:
            stats.send_failures += 1
        now = time.monotonic()
        since = now - self._last_log
        if (what != stats.last_error and since > _LOG_CHANGED_EVERY_S) or since > _LOG_SAME_EVERY_S:
            self._log.warning("type %s: %s; %s", self.etype.name, what, self._retry_note)
            self._last_log = now
        stats.last_error = what

    def recovered(self) -> bool:
        """After a delivery: True when it ends a run of failures."""
        if not self.stats.last_error:
            return False
        self.stats.last_error = ""
        return True


async def drain_until(done: Callable[[], bool], deadline: float, wake: Callable[[], None]) -> bool:
    """The drain-wait loop: poke the drain task until ``done()`` or ``deadline``
    (monotonic). Polls a counter kept in C every 10 ms: only while stopping."""
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110
        wake()
        await asyncio.sleep(0.01)
    return done()
