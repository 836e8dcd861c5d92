"""asyncio producer SDK.

Two ways to send, one path underneath (``_fastpath.ProducerCore``): each event
goes from the call straight into the native batch encoder.

- ``produce()`` is a plain call, like confluent-kafka's: no coroutine, no
  future and no Python object per event. Results come as counts: ``flush()``
  returns a ``FlushReport``, ``on_report`` gets a ``BatchReport`` per
  acknowledged batch, and ``on_delivery=`` asks for a per-event callback.
  When ``max_buffered_events`` are unacknowledged it raises ``BufferFull``.
- ``await send()`` returns a future per event, like aiokafka's, resolving to
  the event id once persisted or failing with ``EventRejected``; it waits for
  buffer space.

Batches are sealed by size or linger and written at once while fewer than
``max_inflight_batches`` are unacknowledged. Retry-later parts are sent again
after the server's back-off hint, and everything unacknowledged is sent again
after a reconnect (same event ids), re-encoded from the frames they went out
in, never from per-event Python objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import os
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from eventbroker import _fastpath as fp
from eventbroker.client.address import parse_servers
from eventbroker.client.connection import Connection, client_ssl
from eventbroker.errors import (
    BufferFull,
    EventRejected,
    ProducerClosed,
    ServerError,
    UsageError,
)
from eventbroker.protocol import (
    CONNECTION_CODECS,
    DEFAULT_LISTEN,
    FLAG_REJECTION_DETAILS,
    Ack,
    ErrorCode,
    ErrorFrame,
    Hello,
    Status,
    Welcome,
    compress_batch_frame,
    encode_heartbeat,
    reason_name,
)

log = logging.getLogger("eventbroker.client")

_MAX_LOCKOUT_WAIT_S = 60.0
_FATAL_CODES = {ErrorCode.BAD_HANDSHAKE, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.AUTH_FAILED}
_PERSISTED = int(Status.PERSISTED)
_RETRY_LATER = int(Status.RETRY_LATER)
MAX_REPORTED_REJECTIONS = 1000  # EventRejected kept per FlushReport (all are counted)

# What on_delivery callbacks receive: the event id, and None (persisted) or the
# exception (EventRejected, ProducerClosed, or the fatal ServerError).
DeliveryCallback = Callable[[bytes, Exception | None], None]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchReport:
    """What one ACK answered: counts, and the rejected events themselves."""

    batch_seq: int
    persisted: int
    rejected: tuple[EventRejected, ...]
    retried: int  # sent again after the server's retry-later hint


@dataclasses.dataclass(frozen=True, slots=True)
class FlushReport:
    """Events answered since the previous ``flush()``: ``persisted`` and
    ``rejected`` by the gateway, ``failed`` without an answer (producer closed,
    fatal server error); ``rejections`` holds the first
    ``MAX_REPORTED_REJECTIONS`` of the rejected."""

    persisted: int
    rejected: int
    failed: int
    rejections: tuple[EventRejected, ...]


def _answer(target: Any, event_id: bytes, exc: Exception | None) -> None:
    """Resolve a future (asyncio or concurrent) or call an on_delivery callback."""
    if isinstance(target, asyncio.Future | concurrent.futures.Future):
        try:
            if not target.done():
                if exc is None:
                    target.set_result(event_id)
                else:
                    target.set_exception(exc)
        except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
            pass  # cancelled by its owner (another thread) in between
        return
    try:
        target(event_id, exc)
    except Exception:
        log.exception("on_delivery callback failed")


def _refused(e: BaseException) -> bool:
    """Nothing listens there: connection refused (on every address a host name resolved to)."""
    if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
        return True
    # asyncio joins the errors of several addresses (localhost: ::1 and 127.0.0.1) into one OSError
    msg = str(e)
    return msg.startswith("Multiple exceptions") and msg.count("[Errno") == msg.count(f"[Errno {errno.ECONNREFUSED}]")


class Producer:
    """Sends events to one eventbroker (or the next of several, on failure).

    ``async with Producer("host:port") as p: p.produce("play", b"{...}")`` or
    ``fut = await p.send(...)``; ``await p.flush()`` waits for the answers.
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
        on_report: Callable[[BatchReport], None] | None = None,
        compression: str | None = None,
    ) -> None:
        """``token``: from ``eventbroker token create``, sent in the handshake.
        ``tls``: True (or an SSLContext of your own) for a TLS listener; the
        server certificate is verified against ``ca_file`` (default: the
        system's CAs) and the host name. ``cert_file``/``key_file``: a client
        certificate for mutual TLS. ``on_report``: called with a
        ``BatchReport`` for every acknowledgement. ``compression``: "zstd"
        or "lz4" to send batches compressed (for a gateway in another zone or
        data centre, where the network is billed), if the server agrees."""
        if compression is not None and compression not in CONNECTION_CODECS:
            raise UsageError(f"compression must be one of {', '.join(CONNECTION_CODECS)} or None")
        self._ask_codec = CONNECTION_CODECS[compression] if compression else 0
        self._codec = 0  # what the server agreed to
        self._servers = parse_servers(servers)
        self._server_idx = 0
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self._linger_s = linger_ms / 1000
        self._batch_max_bytes = batch_max_bytes
        self._max_inflight = max_inflight_batches
        self._connect_timeout_s = connect_timeout_s
        self._backoff = reconnect_backoff_ms
        self._hb_override = heartbeat_interval_ms
        self._token = token.encode() if token else b""
        self._ssl = client_ssl(tls, ca_file, cert_file, key_file)
        self._on_report = on_report
        # 16-byte event ids: these 8 random bytes, then a counter (native)
        self._core = fp.ProducerCore(os.urandom(8), batch_max_bytes, max_buffered_events)
        self._core.on_first = self._arm_linger
        self._core.on_sealed = self._pump
        self._linger_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._outbox: deque[fp.OutBatch] = deque()
        self._inflight: dict[int, fp.OutBatch] = {}
        # answered retry-later, waiting out the hint: (batch, indices)
        self._retry_waiting: list[tuple[fp.OutBatch, list[int]]] = []
        self._space = asyncio.Event()
        self._space.set()
        self._space_hook: Callable[[], None] | None = None  # SyncProducer: wakes blocked threads
        self._idle = asyncio.Event()
        self._idle.set()
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
        self._counts = {"persisted": 0, "rejected": 0, "failed": 0, "retried": 0, "resent_after_reconnect": 0,
                        "connect_failures": 0}
        self._at_last_flush = (0, 0, 0)  # _counts' persisted, rejected, failed when flush() last reported
        self._rejections: list[EventRejected] = []

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context connections use; None: plaintext."""
        return self._ssl

    @property
    def id_prefix(self) -> bytes:
        """The first 8 bytes of every event id this producer generates."""
        return self._core.id_prefix

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: ``sent`` (produced), ``persisted``,
        ``rejected`` (by the gateway), ``failed`` (closed or a fatal error
        before an answer), ``retried``, ``resent_after_reconnect``,
        ``connect_failures``; ``buffered``: waiting for an answer now. Events
        refused before they were queued (too large, bad arguments, buffer
        full) raised at the call and are not counted."""
        return {"sent": self._core.produced, **self._counts, "buffered": self._core.unresolved}

    # lifecycle

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._connection_loop(), name="eventbroker-producer-conn"))
        if self._core.count:  # produced before start: the open batch needs its timer
            self._arm_linger()

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self, timeout_s: float | None = None) -> FlushReport:
        """Send what is batched and wait until no event is left unanswered
        (as confluent-kafka's ``flush``, that includes events produced while
        it waits, from other tasks or threads); returns what was answered
        since the previous flush."""
        self._core.seal()
        async with asyncio.timeout(timeout_s):
            while self._core.unresolved:
                self._idle.clear()
                await self._idle.wait()
        report = self._take_report()
        if self._fatal is not None and report.failed:
            raise self._fatal
        return report

    def _take_report(self) -> FlushReport:
        c = self._counts
        now = (c["persisted"], c["rejected"], c["failed"])
        persisted, rejected, failed = (n - before for n, before in zip(now, self._at_last_flush, strict=True))
        self._at_last_flush = now
        report = FlushReport(persisted, rejected, failed, tuple(self._rejections))
        self._rejections = []
        return report

    async def close(self, timeout_s: float | None = 60.0) -> None:
        """Flush, then close the connection. Events still unacknowledged after
        ``timeout_s`` fail with ``ProducerClosed``."""
        if self._closed:
            return
        self._closing = True
        self._core.closed = True
        try:
            await self.flush(timeout_s)
        except (TimeoutError, ServerError):
            pass
        finally:
            self._closed = True
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._linger_handle is not None:
                self._linger_handle.cancel()
            if self._conn is not None:
                self._conn.close()
            self._fail_all(ProducerClosed("producer closed before the event was acknowledged"))

    # sending

    def produce(
        self,
        event_type: str,
        payload: bytes,
        *,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        event_id: bytes | None = None,
        schema_version: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Add one event to the open batch, at once and without an object per
        event. ``on_delivery(event_id, error_or_None)`` is called once the
        event is answered, if given. ``schema_version``: the version of the
        type's schema the payload is written against (default: the gateway
        validates against the latest). Raises ``BufferFull`` while
        ``max_buffered_events`` events are unanswered, ``EventRejected``
        (``too_large``) for an event over the server's limit,
        ``ProducerClosed`` once closing; nothing is added then."""
        self._core.produce(event_type, payload, key, timestamp_ms, event_id, schema_version, on_delivery)

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
        """Queue one event; the returned future resolves to its event id once
        persisted, or fails with ``EventRejected``. Waits while
        ``max_buffered_events`` events are unanswered."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        while True:
            try:
                self._core.produce(event_type, payload, key, timestamp_ms, event_id, schema_version, fut)
                return fut
            except BufferFull:
                await self.wait_for_space()
            except EventRejected as e:  # too large for the server: answered without sending
                fut.set_exception(e)
                return fut

    async def send_and_wait(self, event_type: str, payload: bytes, **kw: Any) -> bytes:
        return await (await self.send(event_type, payload, **kw))

    async def wait_for_space(self) -> None:
        """Wait until fewer than ``max_buffered_events`` events are unanswered."""
        core = self._core
        while core.unresolved >= core.max_buffered and not self._closed:
            self._space.clear()
            await self._space.wait()

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

    def _arm_linger(self) -> None:
        if self._linger_handle is None and not self._closed and self._loop is not None:
            self._linger_handle = self._loop.call_later(self._linger_s, self._linger_fire)

    def _linger_fire(self) -> None:
        self._linger_handle = None
        self._core.seal()

    def _set_limits(self, welcome: Welcome) -> None:
        core = self._core
        core.max_event_bytes = welcome.max_event_bytes
        core.max_events = welcome.max_events_per_batch
        core.frame_limit = min(welcome.max_frame_bytes, max(self._batch_max_bytes * 2, 64 * 1024))

    def _pump(self) -> None:
        """Take the sealed batches and write what the window allows."""
        sealed = self._core.take_sealed()
        if sealed:
            self._outbox.extend(sealed)
            if self._linger_handle is not None and not self._core.count:
                self._linger_handle.cancel()
                self._linger_handle = None
        conn = self._conn
        if conn is None or conn.goaway or self._welcome is None:
            return
        outbox = self._outbox
        inflight = self._inflight
        codec = self._codec
        while outbox and len(inflight) < self._max_inflight and conn.writable:
            batch = outbox.popleft()
            inflight[batch.seq] = batch
            conn.write(compress_batch_frame(batch.frame, codec) if codec else batch.frame)

    # acks

    def on_ack(self, ack: Ack) -> None:
        batch = self._inflight.get(ack.batch_seq)
        if batch is None:
            return  # a batch answered before a reconnect; already resent
        futs = batch.futures
        persisted = 0
        rejected: list[EventRejected] = []
        retry: list[int] = []
        retry_after = 0
        entries = ack.entries
        if len(entries) > 1:  # entries that list their events first; the others cover the rest
            entries = tuple(sorted(entries, key=lambda e: not e.indices))
        for e in entries:
            if e.status == _PERSISTED and futs is None:
                persisted += batch.take(e.type_index, e.indices, False)
                continue
            idxs = batch.take(e.type_index, e.indices, True)
            if not idxs:
                continue
            if e.status == _PERSISTED:
                persisted += len(idxs)
                if futs is not None:
                    for i in idxs:
                        if futs[i] is not None:
                            _answer(futs[i], batch.event_id(i), None)
            elif e.status == _RETRY_LATER:
                retry += idxs
                retry_after = max(retry_after, e.retry_after_ms)
            else:
                reason = reason_name(e.reason)
                for i in idxs:
                    exc = EventRejected(reason, batch.event_id(i), batch.event_type(i).decode().partition("@")[0],
                                        ack.details.get(i, ""))
                    rejected.append(exc)
                    if futs is not None and futs[i] is not None:
                        _answer(futs[i], exc.event_id, exc)
        if persisted or rejected:
            self._counts["persisted"] += persisted
            self._counts["rejected"] += len(rejected)
            if rejected and len(self._rejections) < MAX_REPORTED_REJECTIONS:
                self._rejections += rejected[:MAX_REPORTED_REJECTIONS - len(self._rejections)]
            self._resolved(persisted + len(rejected))
        if retry:
            self._counts["retried"] += len(retry)
            delay = retry_after / 1000 * (1 + random.random() / 4)  # never before the hint
            waiting = (batch, retry)
            self._retry_waiting.append(waiting)
            asyncio.get_running_loop().call_later(delay, self._requeue, waiting)
        if self._on_report is not None:
            try:
                self._on_report(BatchReport(batch.seq, persisted, tuple(rejected), len(retry)))
            except Exception:
                log.exception("on_report callback failed")
        if batch.left == 0:
            del self._inflight[batch.seq]
            conn = self._conn
            if conn is not None and conn.goaway and not self._inflight:
                conn.close()
            self._pump()

    def _resolved(self, n: int) -> None:
        core = self._core
        core.resolved(n)
        if core.unresolved < core.max_buffered:
            self._space.set()
            if self._space_hook is not None:
                self._space_hook()
        if core.unresolved == 0:
            self._idle.set()

    def _requeue(self, waiting: tuple[fp.OutBatch, list[int]]) -> None:
        if self._closed:
            return  # close() fails them (they stay in _retry_waiting for it)
        try:
            self._retry_waiting.remove(waiting)
        except ValueError:
            return  # already failed by close()
        self._core.readd(*waiting)
        self._core.seal()

    def _fail_all(self, exc: Exception) -> None:
        """Answer every unanswered event with ``exc``."""
        pending: list[tuple[fp.OutBatch, list[int] | range]] = [(b, b.unanswered()) for b in self._inflight.values()]
        pending += [(b, range(b.count)) for b in self._outbox]
        pending += [(b, range(b.count)) for b in self._core.take_sealed(True)]
        pending += self._retry_waiting
        self._retry_waiting = []
        self._inflight.clear()
        self._outbox.clear()
        n = 0
        for b, idxs in pending:
            futs = b.futures
            n += len(idxs)
            if futs is not None:
                for i in idxs:
                    if futs[i] is not None:
                        _answer(futs[i], b.event_id(i), exc)
        if n:
            self._counts["failed"] += n
            self._resolved(n)

    # connection management

    def on_goaway(self, conn: Connection) -> None:
        if not self._inflight:
            conn.close()

    def on_writable(self, conn: Connection) -> None:
        if conn is self._conn:
            self._pump()

    def on_server_error(self, err: ErrorFrame) -> None:
        log.warning("server closed the connection: error %s: %s", err.code, err.message)
        if err.code in _FATAL_CODES:
            self._set_fatal(ServerError(err.code, err.message))

    def _set_fatal(self, e: ServerError) -> None:
        self._fatal = e
        self._core.closed_error = e
        self._core.closed = True

    async def _connect_once(self) -> Connection:
        host, port = self._servers[self._server_idx % len(self._servers)]
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl is not None:
            extra = {"ssl": self._ssl, "server_hostname": host, "ssl_handshake_timeout": self._connect_timeout_s}
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(self), host, port, **extra), self._connect_timeout_s
        )
        conn.write(Hello(self.client_id, auth=self._token, flags=FLAG_REJECTION_DETAILS | self._ask_codec).encode())
        try:
            welcome = await asyncio.wait_for(asyncio.shield(conn.welcome), self._connect_timeout_s)
        except BaseException:
            conn.close()
            raise
        self._welcome = welcome
        self._codec = welcome.flags & self._ask_codec
        if self._ask_codec and not self._codec:
            log.info("the server does not take compressed batches; sending them uncompressed")
        self._set_limits(welcome)
        return conn

    def _resend_unacked(self) -> None:
        """After a (re)connect: re-encode every unanswered event, in-flight ones
        first, then the queued and the open batch, so batches respect the
        limits this server announced. Events are copied out of the frames
        they were sent in."""
        inflight = sorted(self._inflight.values(), key=lambda b: b.seq)
        queued = list(self._outbox) + self._core.take_sealed(True)
        if not inflight and not queued:
            return
        self._inflight.clear()
        self._outbox.clear()
        for b in inflight:
            idxs = b.unanswered()
            self._counts["resent_after_reconnect"] += len(idxs)
            self._core.readd(b, idxs)
        for b in queued:
            self._core.readd(b, range(b.count))
        self._core.seal()

    async def _connection_loop(self) -> None:
        delay = self._backoff[0] / 1000
        first = True
        while not self._closed:
            try:
                conn = await self._connect_once()
            except ServerError as e:
                if e.code in _FATAL_CODES:
                    self._set_fatal(e)
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
                self._counts["connect_failures"] += 1
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
            self._pump()
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
