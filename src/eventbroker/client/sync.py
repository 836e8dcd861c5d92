"""Blocking producer: an asyncio ``Producer`` running on a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

from eventbroker.client.producer import Producer
from eventbroker.protocol import DEFAULT_LISTEN


class SyncProducer:
    """``send()`` returns a ``concurrent.futures.Future`` resolving to the event id.

    ``with SyncProducer("host:port") as p: p.send("play", b"{}").result()``
    """

    def __init__(self, servers: str | Sequence[str] = DEFAULT_LISTEN, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eventbroker-producer", daemon=True)
        self._thread.start()
        self._producer: Producer = self._call(self._make(servers, kwargs))

    async def _make(self, servers: str | Sequence[str], kwargs: dict[str, Any]) -> Producer:
        p = Producer(servers, **kwargs)
        await p.start()
        return p

    def _call(self, coro: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _send(self, event_type: str, payload: bytes, kw: dict[str, Any]) -> bytes:
        return await (await self._producer.send(event_type, payload, **kw))

    def send(self, event_type: str, payload: bytes, **kw: Any) -> concurrent.futures.Future[bytes]:
        """Queue an event; the future resolves to its id once persisted."""
        return asyncio.run_coroutine_threadsafe(self._send(event_type, payload, kw), self._loop)

    def send_and_wait(self, event_type: str, payload: bytes, timeout_s: float | None = None, **kw: Any) -> bytes:
        """Send one event and block until it is persisted; returns its id."""
        return self.send(event_type, payload, **kw).result(timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        self._call(self._producer.flush(timeout_s))

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
    def stats(self) -> dict[str, int]:
        return dict(self._producer.stats)

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
