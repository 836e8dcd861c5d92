"""Blocking producer: an asyncio ``Producer`` on a background thread.

``produce()`` and ``send()`` put the event into the native batch encoder from
the caller's thread, without a hop to the loop thread per event; the loop
thread seals, writes and answers (see ``_fastpath.ProducerCore`` on why this
is safe under the GIL). Futures and ``on_delivery`` callbacks are answered on
the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

from eventbroker.client.producer import DeliveryCallback, FlushReport, Producer
from eventbroker.errors import BufferFull, EventRejected, UsageError
from eventbroker.protocol import DEFAULT_LISTEN


class SyncProducer:
    """``send()`` returns a ``concurrent.futures.Future`` resolving to the event id.

    ``with SyncProducer("host:port") as p: p.produce("play", b"{}"); p.flush()``
    """

    def __init__(self, servers: str | Sequence[str] = DEFAULT_LISTEN, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eventbroker-producer", daemon=True)
        self._thread.start()
        self._producer: Producer = self._call(self._make(servers, kwargs))
        self._space = threading.Event()
        p, loop = self._producer, self._loop
        self._core = p._core
        self._core.on_first = lambda: loop.call_soon_threadsafe(p._arm_linger)
        self._core.on_sealed = lambda: loop.call_soon_threadsafe(p._pump)
        p._space_hook = self._space.set

    async def _make(self, servers: str | Sequence[str], kwargs: dict[str, Any]) -> Producer:
        p = Producer(servers, **kwargs)
        await p.start()
        return p

    def _call(self, coro: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def produce(self, event_type: str, payload: bytes, *, key: bytes | None = None, timestamp_ms: int | None = None,
                event_id: bytes | None = None, schema_version: int | None = None,
                on_delivery: DeliveryCallback | None = None) -> None:
        """Add one event without waiting; see ``Producer.produce`` (raises ``BufferFull`` when full)."""
        self._core.produce(event_type, payload, key, timestamp_ms, event_id, schema_version, on_delivery)

    def send(self, event_type: str, payload: bytes, *, key: bytes | None = None, timestamp_ms: int | None = None,
             event_id: bytes | None = None, schema_version: int | None = None,
             timeout_s: float | None = None) -> concurrent.futures.Future[bytes]:
        """Queue an event, blocking while the buffer is full (up to ``timeout_s``:
        then ``BufferFull``); the future resolves to its id once persisted."""
        if threading.current_thread() is self._thread:
            raise UsageError("SyncProducer.send() from its own loop thread (a callback) would wait for "
                             "acknowledgements that thread has to read; use produce() there")
        fut: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        core = self._core
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        while True:
            try:
                core.produce(event_type, payload, key, timestamp_ms, event_id, schema_version, fut)
                return fut
            except BufferFull:
                if deadline is not None and self._loop.time() >= deadline:
                    raise
                self._space.clear()
                if core.unresolved >= core.max_buffered:
                    self._space.wait(0.05)
            except EventRejected as e:  # too large for the server
                fut.set_exception(e)
                return fut

    def send_and_wait(self, event_type: str, payload: bytes, timeout_s: float | None = None, **kw: Any) -> bytes:
        """Send one event and block until it is persisted; returns its id."""
        return self.send(event_type, payload, **kw).result(timeout_s)

    def flush(self, timeout_s: float | None = None) -> FlushReport:
        """Block until every event produced so far is answered; see ``Producer.flush``."""
        report: FlushReport = self._call(self._producer.flush(timeout_s))
        return report

    def close(self, timeout_s: float | None = 60.0) -> None:
        if not self._loop.is_running():
            return
        try:
            self._call(self._producer.close(timeout_s))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @property
    def id_prefix(self) -> bytes:
        return self._producer.id_prefix

    @property
    def stats(self) -> dict[str, int]:
        return self._producer.stats

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
