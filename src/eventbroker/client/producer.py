"""asyncio producer SDK.

``Producer.send()`` puts an event into the open batch and returns a future
that resolves to the event id once the gateway acknowledged the event as
persisted in Kafka, or fails with ``EventRejected`` carrying the reason.
Batches are sealed by size or linger, at most ``max_inflight_batches`` are
unacknowledged at a time, retry-later parts are sent again after the server's
back-off hint, and everything unacknowledged is sent again after a reconnect
(same event ids, so consumers can drop the duplicates).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from eventbroker import _fastpath as fp
from eventbroker.client.address import parse_servers
from eventbroker.client.batches import Batch, IdGenerator, Pending
from eventbroker.client.connection import Connection, client_ssl
from eventbroker.errors import EventRejected, ProducerClosed, ServerError, UsageError
from eventbroker.protocol import (
    DEFAULT_LISTEN,
    EVENT_HEADER_BYTES,
    FLAG_REJECTION_DETAILS,
    MAX_KEY_BYTES,
    MAX_TYPE_NAME_BYTES,
    MAX_TYPES_PER_BATCH,
    Ack,
    ErrorCode,
    ErrorFrame,
    Hello,
    Status,
    Welcome,
    encode_heartbeat,
    reason_name,
)

log = logging.getLogger("eventbroker.client")

_MAX_LOCKOUT_WAIT_S = 60.0
_FATAL_CODES = {ErrorCode.BAD_HANDSHAKE, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.AUTH_FAILED}


def _refused(e: BaseException) -> bool:
    """Nothing listens there: connection refused (on every address a host name resolved to)."""
    if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
        return True
    # asyncio joins the errors of several addresses (localhost: ::1 and 127.0.0.1) into one OSError
    msg = str(e)
    return msg.startswith("Multiple exceptions") and msg.count("[Errno") == msg.count(f"[Errno {errno.ECONNREFUSED}]")


class Producer:
    """Sends events to one eventbroker (or the next of several, on failure).

    Use as ``async with Producer("host:port") as p: fut = await p.send(...)``.
    """

    def __init__(
        self,
        servers: str | Sequence[str] = DEFAULT_LISTEN,
        *,
        client_id: str | None = None,
        linger_ms: float = 5.0,
        batch_max_bytes: int = 256 * 1024,
        max_inflight_batches: int = 16,
        max_buffered_events: int = 200_000,
        connect_timeout_s: float = 10.0,
        reconnect_backoff_ms: tuple[int, int] = (50, 5000),
        heartbeat_interval_ms: int | None = None,
        token: str | None = None,
        tls: bool | ssl.SSLContext = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """``token``: from ``eventbroker token create``, sent in the handshake.
        ``tls``: True (or an SSLContext of your own) for a TLS listener; the
        server certificate is verified against ``ca_file`` (default: the
        system's CAs) and the host name. ``cert_file``/``key_file``: a client
        certificate for mutual TLS."""
        self._servers = parse_servers(servers)
        self._server_idx = 0
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self._linger_s = linger_ms / 1000
        self._batch_max_bytes = batch_max_bytes
        self._max_inflight = max_inflight_batches
        self._max_buffered = max_buffered_events
        self._connect_timeout_s = connect_timeout_s
        self._backoff = reconnect_backoff_ms
        self._hb_override = heartbeat_interval_ms
        self._token = token.encode() if token else b""
        self._ssl = client_ssl(tls, ca_file, cert_file, key_file)
        self._ids = IdGenerator()
        self._enc = fp.BatchEncoder()
        self._open: list[Pending] = []
        self._open_types: list[int] = []
        self._linger_handle: asyncio.TimerHandle | None = None
        self._outbox: deque[Batch] = deque()
        self._inflight: dict[int, Batch] = {}
        self._retry_waiting: list[list[Pending]] = []  # answered retry-later, waiting out the hint
        self._seq = itertools.count(1)
        self._unresolved = 0
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake_sender = asyncio.Event()
        self._conn: Connection | None = None
        self._welcome: Welcome | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._closed = False
        self._fatal: ServerError | None = None
        self.reconnects = 0
        self._conn_failures = 0
        self._last_conn_error = ""
        self._connected = asyncio.Event()
        self._all_refused = asyncio.Event()  # every address refused in a row (nothing listens)
        self._refused_in_a_row = 0
        self.stats = {"sent": 0, "persisted": 0, "rejected": 0, "retried": 0, "resent_after_reconnect": 0,
                      "connect_failures": 0}

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context connections use; None: plaintext."""
        return self._ssl

    # lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._connection_loop(), name="eventbroker-producer-conn"))
        self._tasks.append(loop.create_task(self._sender_loop(), name="eventbroker-producer-send"))

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every event sent so far is acknowledged (or rejected)."""
        self._seal()
        await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._fatal is not None and self._unresolved:
            raise self._fatal

    async def close(self, timeout_s: float | None = 60.0) -> None:
        """Flush, then close the connection. Events still unacknowledged after
        ``timeout_s`` fail with ``ProducerClosed``."""
        if self._closed:
            return
        self._closing = True
        try:
            await self.flush(timeout_s)
        except (TimeoutError, ServerError):
            pass
        finally:
            self._closed = True
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._conn is not None:
                self._conn.close()
            self._fail_all(ProducerClosed("producer closed before the event was acknowledged"))

    # sending

    async def send(
        self,
        event_type: str,
        payload: bytes,
        *,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        event_id: bytes | None = None,
        schema_version: int | None = None,
    ) -> asyncio.Future[bytes]:
        """Queue one event; the returned future resolves to its event id once persisted.

        ``schema_version``: the version of the type's schema the payload is
        written against (default: the gateway validates against the latest).
        Waits while ``max_buffered_events`` events are unacknowledged.
        """
        if self._closing or self._closed:
            raise ProducerClosed("producer is closed")
        if self._fatal is not None:
            raise self._fatal
        while self._unresolved >= self._max_buffered:
            self._space.clear()
            await self._space.wait()
        if schema_version is not None:
            if isinstance(schema_version, bool) or not isinstance(schema_version, int) or schema_version < 1:
                raise UsageError("schema_version must be a positive integer")
            event_type = f"{event_type}@{schema_version}"
        type_b = event_type.encode("utf-8")
        if not 0 < len(type_b) <= MAX_TYPE_NAME_BYTES:
            raise UsageError("event type name must be 1..255 bytes of UTF-8")
        if key is not None and len(key) > MAX_KEY_BYTES:
            raise UsageError(f"key longer than {MAX_KEY_BYTES} bytes")
        if event_id is not None and (len(event_id) != 16 or not any(event_id)):
            raise UsageError("event_id must be 16 bytes, not all zero")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        eid = event_id if event_id is not None else self._ids()
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        ev = Pending(type_b, eid, ts, key, payload, fut)
        self._unresolved += 1
        self._idle.clear()
        self.stats["sent"] += 1
        max_event = self._welcome.max_event_bytes if self._welcome else 512 * 1024
        if len(payload) + (len(key) if key else 0) > max_event:
            self._resolve(ev, EventRejected("too_large", eid, event_type))
            return fut
        self._append(ev)
        return fut

    async def wait_connected(self, timeout_s: float | None, *, until_refused: bool = False) -> None:
        """Wait until a connection is up; ``ConnectionError`` with the last reason
        if not within ``timeout_s``. With ``until_refused`` give up as soon as
        every address has refused a connection (nothing listens there)."""
        waits = [asyncio.ensure_future(self._connected.wait())]
        if until_refused:
            waits.append(asyncio.ensure_future(self._all_refused.wait()))
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self._connected.is_set():
            raise ConnectionError(f"cannot connect to {self._last_conn_error or 'any server'}")
        if self._fatal is not None:
            raise self._fatal

    async def send_and_wait(self, event_type: str, payload: bytes, **kw: Any) -> bytes:
        return await (await self.send(event_type, payload, **kw))

    def _append(self, ev: Pending) -> None:
        size = EVENT_HEADER_BYTES + len(ev.payload) + (len(ev.key) if ev.key else 0)
        limit = self._frame_limit()
        enc = self._enc
        if self._open and (
            enc.frame_bytes + size + 256 > limit
            or enc.count >= self._max_events()
            or enc.type_count >= MAX_TYPES_PER_BATCH
        ):
            self._seal()
        ti = self._enc.add(ev.type, ev.event_id, ev.timestamp_ms, ev.key, ev.payload)
        self._open.append(ev)
        self._open_types.append(ti)
        if self._enc.frame_bytes >= self._batch_max_bytes:
            self._seal()
        elif self._linger_handle is None:
            self._linger_handle = asyncio.get_running_loop().call_later(self._linger_s, self._seal)

    def _frame_limit(self) -> int:
        mf = self._welcome.max_frame_bytes if self._welcome else 1024 * 1024
        return min(mf, max(self._batch_max_bytes * 2, 64 * 1024))

    def _max_events(self) -> int:
        return self._welcome.max_events_per_batch if self._welcome else 65536

    def _seal(self) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if not self._open:
            return
        seq = next(self._seq)
        batch = Batch(seq, self._enc.finish(seq), self._open, self._open_types)
        self._open = []
        self._open_types = []
        self._outbox.append(batch)
        self._wake_sender.set()

    async def _sender_loop(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while self._outbox:
                conn = self._conn
                if conn is None or conn.goaway or self._welcome is None:
                    break
                if len(self._inflight) >= self._max_inflight:
                    break
                await conn.can_write.wait()
                if conn is not self._conn or conn.goaway:
                    break
                batch = self._outbox.popleft()
                batch.sent_at = time.monotonic()
                self._inflight[batch.seq] = batch
                conn.write(batch.frame)

    # acks

    def on_ack(self, ack: Ack) -> None:
        batch = self._inflight.get(ack.batch_seq)
        if batch is None:
            return  # a batch answered before a reconnect; already resent
        # Entries that list their events come first; the others cover the rest.
        retry: list[Pending] = []
        retry_after = 0
        for e in sorted(ack.entries, key=lambda e: not e.indices):
            idxs = e.indices if e.indices else batch.by_type.get(e.type_index, ())
            for i in idxs:
                if i >= len(batch.events) or batch.answered[i]:
                    continue
                batch.answered[i] = 1
                batch.left -= 1
                ev = batch.events[i]
                if e.status == Status.PERSISTED:
                    self._resolve(ev, None)
                elif e.status == Status.RETRY_LATER:
                    retry.append(ev)
                    retry_after = max(retry_after, e.retry_after_ms)
                else:
                    self._resolve(ev, EventRejected(reason_name(e.reason), ev.event_id,
                                                    ev.type.decode().partition("@")[0], ack.details.get(i, "")))
        if retry:
            self.stats["retried"] += len(retry)
            delay = retry_after / 1000 * (1 + random.random() / 4)  # never before the hint
            self._retry_waiting.append(retry)
            asyncio.get_running_loop().call_later(delay, self._requeue, retry)
        if batch.left == 0:
            del self._inflight[batch.seq]
            self._wake_sender.set()
            conn = self._conn
            if conn is not None and conn.goaway and not self._inflight:
                conn.close()

    def _requeue(self, events: list[Pending]) -> None:
        if self._closed:
            return  # close() fails them (they stay in _retry_waiting for it)
        try:
            self._retry_waiting.remove(events)
        except ValueError:
            return  # already failed by close()
        for ev in events:
            self._append(ev)
        self._seal()

    def _resolve(self, ev: Pending, exc: BaseException | None) -> None:
        fut = ev.future
        if not fut.done():
            if exc is None:
                fut.set_result(ev.event_id)
                self.stats["persisted"] += 1
            else:
                fut.set_exception(exc)
                self.stats["rejected"] += 1
        self._unresolved -= 1
        if self._unresolved < self._max_buffered:
            self._space.set()
        if self._unresolved == 0:
            self._idle.set()

    def _fail_all(self, exc: BaseException) -> None:
        pending = [ev for b in self._inflight.values() for i, ev in enumerate(b.events) if not b.answered[i]]
        pending += [ev for b in self._outbox for ev in b.events] + self._open
        pending += [ev for waiting in self._retry_waiting for ev in waiting]
        self._retry_waiting.clear()
        self._inflight.clear()
        self._outbox.clear()
        self._open = []
        for ev in pending:
            self._resolve(ev, exc)

    # connection management

    def on_goaway(self, conn: Connection) -> None:
        if not self._inflight:
            conn.close()

    def on_server_error(self, err: ErrorFrame) -> None:
        log.warning("server closed the connection: error %s: %s", err.code, err.message)
        if err.code in _FATAL_CODES:
            self._fatal = ServerError(err.code, err.message)

    async def _connect_once(self) -> Connection:
        host, port = self._servers[self._server_idx % len(self._servers)]
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra = {"ssl": self._ssl, "server_hostname": host, "ssl_handshake_timeout": self._connect_timeout_s}
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(self), host, port, **extra), self._connect_timeout_s
        )
        conn.write(Hello(self.client_id, auth=self._token, flags=FLAG_REJECTION_DETAILS).encode())
        try:
            welcome = await asyncio.wait_for(asyncio.shield(conn.welcome), self._connect_timeout_s)
        except BaseException:
            conn.close()
            raise
        self._welcome = welcome
        return conn

    def _resend_unacked(self) -> None:
        """After a (re)connect: re-encode every unanswered event, in-flight ones
        first, so batches respect the limits this server announced."""
        unacked = [ev for b in sorted(self._inflight.values(), key=lambda b: b.seq)
                   for i, ev in enumerate(b.events) if not b.answered[i]]
        queued = [ev for b in self._outbox for ev in b.events]
        if not unacked and not queued:
            return
        self._inflight.clear()
        self._outbox.clear()
        self.stats["resent_after_reconnect"] += len(unacked)
        for ev in unacked + queued:
            self._append(ev)
        self._seal()

    async def _connection_loop(self) -> None:
        delay = self._backoff[0] / 1000
        first = True
        while not self._closed:
            try:
                conn = await self._connect_once()
            except ServerError as e:
                if e.code in _FATAL_CODES:
                    self._fatal = e
                    self._fail_all(e)
                    return
                if e.retry_after_ms:  # locked out for a while (not our credentials): wait, then try again
                    self._last_conn_error = f"{e.message} (error {e.code})"
                    log.warning("the server asks to connect again in %.1fs: %s", e.retry_after_ms / 1000, e.message)
                    wait_s = min(e.retry_after_ms / 1000, _MAX_LOCKOUT_WAIT_S)  # a lock-out lasts a minute
                    await asyncio.sleep(wait_s * (1 + random.random() / 4))
                conn = None
            except (OSError, TimeoutError, ConnectionError) as e:
                host, port = self._servers[self._server_idx % len(self._servers)]
                self._last_conn_error = f"{host}:{port}: {e or type(e).__name__}"
                if not self._conn_failures:
                    log.warning("cannot connect to %s", self._last_conn_error)
                self._refused_in_a_row = self._refused_in_a_row + 1 if _refused(e) else 0
                if self._refused_in_a_row >= len(self._servers):
                    self._all_refused.set()
                conn = None
            if conn is None:
                self._conn_failures += 1
                self.stats["connect_failures"] += 1
                self._server_idx += 1
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff[1] / 1000)
                continue
            if not first:
                self.reconnects += 1
            first = False
            if self._conn_failures:
                log.info("connected to %s:%s after %d failed attempts", *self._servers[self._server_idx % len(self._servers)], self._conn_failures)
            self._conn_failures = 0
            self._refused_in_a_row = 0
            self._all_refused.clear()
            delay = self._backoff[0] / 1000
            self._conn = conn
            self._connected.set()
            self._resend_unacked()
            self._wake_sender.set()
            hb = asyncio.get_running_loop().create_task(self._heartbeats(conn))
            try:
                await conn.lost
            finally:
                hb.cancel()
                self._conn = None
                self._connected.clear()
            if conn.goaway:
                self._server_idx += 1

    async def _heartbeats(self, conn: Connection) -> None:
        welcome = self._welcome
        interval = (self._hb_override or (welcome.heartbeat_interval_ms if welcome else 5000)) / 1000
        token = 0
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - conn.last_rx > 3 * interval and (self._inflight or token):
                log.warning("no answer from the server for %.1fs; reconnecting", 3 * interval)
                if conn.transport is not None:
                    conn.transport.abort()
                return
            token += 1
            conn.write(encode_heartbeat(token))
