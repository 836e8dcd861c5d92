"""One producer connection: ``Connection``, an asyncio protocol.

``data_received`` feeds the bytes to the native ``FrameReader`` and hands each
EVENT_BATCH frame to the router (the native splitter): Python does per-frame
work only. The connection is the lanes' ``AckTarget``: it collects the ACK
entries they answer and writes them once per loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from typing import Protocol, cast

from eventbroker import _fastpath as fp
from eventbroker.config import ServerConfig
from eventbroker.errors import AuthFailed, ProtocolError
from eventbroker.gateway.router import Router
from eventbroker.protocol import (
    FLAG_COMPRESS_LZ4,
    FLAG_COMPRESS_ZSTD,
    FLAG_REJECTION_DETAILS,
    FRAME_FLAG_COMPRESSED,
    MAX_HELLO_BYTES,
    AckEntry,
    ErrorCode,
    ErrorFrame,
    FrameType,
    Goaway,
    GoawayReason,
    Hello,
    Reason,
    Status,
    Welcome,
    decode_heartbeat,
    decompress_batch_body,
    encode_ack_body,
    encode_frame,
    encode_heartbeat,
    error_name,
)
from eventbroker.security.policy import Security
from eventbroker.security.tokens import Identity

log = logging.getLogger("eventbroker.server")

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2
_LINGER_S = 1.0
_REFUSED_LINGER_S = 0.1
_ABORT_AFTER_S = 5.0
# Framing errors before the handshake mean the peer does not speak this protocol.
_NOT_OUR_PROTOCOL = {ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_FRAME_TYPE, ErrorCode.MALFORMED_FRAME}


class Listener(Protocol):
    """What a connection needs of the listener that accepted it (server.py)."""

    cfg: ServerConfig
    router: Router
    security: Security
    server_id: str
    draining: bool
    handshake_bytes: int  # partial HELLOs buffered by all connections in their handshake

    @property
    def stats(self) -> ConnectionStats: ...

    def now(self) -> float: ...

    def connection_opened(self, conn: Connection) -> tuple[int, str] | tuple[int, str, int] | None: ...

    def connection_closed(self, conn: Connection) -> None: ...


class ConnectionStats:
    """Counters of all connections of one listener."""

    __slots__ = ("connections", "connections_total", "protocol_errors", "batches", "acks_sent", "errors_by_code")

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        self.protocol_errors = 0
        self.batches = 0
        self.acks_sent = 0
        self.errors_by_code: dict[int, int] = {}  # ERROR frames sent, by code


class _InflightBatch:
    """One accepted batch, as its lanes see it (their ``AckTarget``).

    Its bytes count against the connection's in-flight limit until its last
    part is answered. It is keyed by itself, not by the producer's
    ``batch_seq``: a producer that reuses a number (a bug, or an attack) must
    not make the count drift."""

    __slots__ = ("conn", "size", "parts")

    def __init__(self, conn: Connection, size: int) -> None:
        self.conn = conn
        self.size = size
        self.parts = 0

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def part_persisted(self, batch_seq: int, type_index: int, count: int) -> None:
        self.conn.part_answered(self, batch_seq, AckEntry(type_index, Status.PERSISTED, Reason.NONE, count))

    def part_retry(self, batch_seq: int, type_index: int, count: int, reason: int, retry_after_ms: int) -> None:
        """An accepted part could not be delivered: the producer must send it again."""
        self.conn.part_answered(self, batch_seq,
                                AckEntry(type_index, Status.RETRY_LATER, reason, count, retry_after_ms))


class Connection(asyncio.Protocol):
    """One producer connection."""

    def __init__(self, server: Listener) -> None:
        self._server = server
        # Until HELLO, a frame can be no larger than a HELLO can be.
        self._reader = fp.FrameReader(MAX_HELLO_BYTES)
        self._handshake_buffered = 0
        self._transport: asyncio.Transport | None = None
        self._state = _HANDSHAKE
        self._pending_acks: dict[int, list[AckEntry]] = {}
        self._flush_scheduled = False
        self._parts_owed = 0  # batch parts waiting for Kafka on this connection
        self._eof = False
        self.closed = False
        self.client_id = ""
        self.peer = ""
        self.addr = ""
        self.identity: Identity | None = None
        self.allowed: frozenset[bytes] | None = None  # type names it may send; None: all
        self.details = False  # the producer reads rejection details (HELLO flag)
        self._codec = 0  # FLAG_COMPRESS_*: the producer may send compressed batches
        self.last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._inflight_bytes = 0  # bytes of batches with parts not yet answered
        self._paused_for: set[str] = set()  # why reading is paused: "acks", "inflight"
        self._auth: tuple[bytes, dict | None] = (b"", None)
        self.paused_since: dict[str, float] = {}

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.addr = str(peer[0]) if isinstance(peer, tuple) else self.peer
        loop = asyncio.get_running_loop()
        self.last_rx = loop.time()
        refusal = self._server.connection_opened(self)
        if refusal is not None:
            # A refused connection is let go almost at once: a flood of them
            # must not hold a file descriptor each for the whole linger.
            code, message, *hint = refusal
            self.close_with_error(code, message, hint[0] if hint else 0, linger_s=_REFUSED_LINGER_S)
            return
        limits = self._server.security.limits
        self._timer = loop.call_later(limits.handshake_timeout_ms / 1000, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if self._state == _HANDSHAKE:
            self._server.security.stats.handshake_timeouts += 1
            self.close_with_error(ErrorCode.TIMEOUT, "no HELLO within the handshake timeout")

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        reader = self._reader
        reader.feed(data)
        try:
            while True:
                ftype = reader.next_frame()
                if ftype < 0:
                    if self._state == _HANDSHAKE:
                        self._count_handshake_bytes()
                    return
                self.last_rx = self._server.now()  # whole frames only: trickled bytes do not count
                if ftype == FrameType.EVENT_BATCH and self._state == _OPEN:
                    if reader.frame_flags:  # FRAME_FLAG_COMPRESSED (the reader allows no other bit)
                        reader.replace_body(decompress_batch_body(reader.body(), self._codec,
                                                                  self._server.cfg.max_frame_bytes))
                    self._on_batch()
                elif self._state == _HANDSHAKE:
                    self._on_handshake(ftype)
                elif ftype == FrameType.HEARTBEAT:
                    self._write(encode_heartbeat(decode_heartbeat(reader.body())))
                else:
                    raise ProtocolError(
                        ErrorCode.UNEXPECTED_FRAME, f"frame type {ftype} is not sent by producers"
                    )
                if self._state == _CLOSED:
                    return
        except ProtocolError as e:
            if self._state == _HANDSHAKE and e.code in _NOT_OUR_PROTOCOL:
                self.close_with_error(ErrorCode.BAD_HANDSHAKE, f"not an eventbroker v1 stream, expected HELLO: {e.message}")
            else:
                self.close_with_error(e.code, e.message)
        except Exception:  # a bug here must not take the daemon down
            log.exception("internal error on connection from %s", self.peer)
            # Rings may hold events of this batch with no part to answer for
            # them; hand everything back (retry-later) so no ack is ever wrong.
            self._server.router.shed_all("internal error while accepting a batch")
            self.close_with_error(ErrorCode.INTERNAL, "internal error")

    def eof_received(self) -> bool | None:
        if self._state != _CLOSED and self._reader.buffered_bytes:
            self.close_with_error(
                ErrorCode.TRUNCATED_STREAM,
                f"connection ended inside a frame ({self._reader.buffered_bytes} bytes of it)",
            )
            return None
        if self._state != _CLOSED and (self._parts_owed or self._pending_acks):
            # The producer finished sending but still waits for acks: keep the
            # connection until they are written, then close it.
            self._eof = True
            return True
        return None  # close the transport

    def _count_handshake_bytes(self) -> None:
        """A partial HELLO is held in memory: count what its buffer takes
        (allocated, at least 64 KiB) against max_handshake_bytes."""
        held = self._reader.buffer_capacity if self._reader.buffered_bytes else self._handshake_buffered
        server = self._server
        server.handshake_bytes += held - self._handshake_buffered
        self._handshake_buffered = held
        limit = server.security.limits.max_handshake_bytes
        if held and server.handshake_bytes > limit:
            server.security.stats.refused_handshake_budget += 1
            self._release_handshake_bytes()
            self.close_with_error(ErrorCode.CONNECTION_LIMIT, f"too many handshakes in progress (limits."
                                  f"max_handshake_bytes = {limit}); connect again in a moment")

    def _release_handshake_bytes(self) -> None:
        self._server.handshake_bytes -= self._handshake_buffered
        self._handshake_buffered = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_handshake_bytes()
        self._state = _CLOSED
        self.closed = True
        self._pending_acks.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._server.connection_closed(self)

    def _pause(self, why: str) -> None:
        if not self._paused_for and self._transport is not None:
            self._transport.pause_reading()
        if why not in self._paused_for:
            self.paused_since[why] = self._server.now()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        self._paused_for.discard(why)
        if not self._paused_for and self._transport is not None and self._state != _CLOSED:
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        # The producer is not reading its acks: stop reading its batches.
        self._pause("acks")

    def resume_writing(self) -> None:
        self._resume("acks")

    # frames

    def _on_handshake(self, ftype: int) -> None:
        if ftype != FrameType.HELLO:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, f"expected HELLO as the first frame, got type {ftype}")
        hello = Hello.decode(self._reader.body())
        security = self._server.security
        locked = security.locked_out(self.addr)  # failures on connections opened before the limit was reached
        if locked is not None:
            self.close_with_error(*locked)
            return
        peercert = self._transport.get_extra_info("peercert") if self._transport is not None else None
        try:
            self.identity = security.authenticate(hello.auth, peercert)
        except AuthFailed as e:
            security.note_failure(self.addr)
            log.warning("authentication failed for %s (client id %r): %s", self.peer, hello.client_id, e)
            raise ProtocolError(ErrorCode.AUTH_FAILED, "authentication failed") from None
        self._auth = (hello.auth, peercert)  # checked again on every reload
        self.allowed = security.allowed(self.identity)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client_id = hello.client_id
        cfg = self._server.cfg
        self._release_handshake_bytes()
        self._reader.max_frame_bytes = cfg.max_frame_bytes
        self.details = bool(hello.flags & FLAG_REJECTION_DETAILS)
        # A producer asks for one codec; should it set both bits, zstd wins.
        self._codec = next((f for f in (FLAG_COMPRESS_ZSTD, FLAG_COMPRESS_LZ4) if hello.flags & f), 0)
        if self._codec:
            self._reader.allowed_flags = FRAME_FLAG_COMPRESSED
        self._write(
            Welcome(
                flags=(FLAG_REJECTION_DETAILS if self.details else 0) | self._codec,
                max_frame_bytes=cfg.max_frame_bytes,
                max_event_bytes=cfg.max_event_bytes,
                max_events_per_batch=cfg.max_events_per_batch,
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                server_id=self._server.server_id,
            ).encode()
        )
        self._state = _OPEN
        if self._server.draining:
            self.send_goaway()

    def _on_batch(self) -> None:
        server = self._server
        batch = _InflightBatch(self, self._reader.body_length)
        got = server.router.ingest(self._reader, int(time.time() * 1000), self.allowed, batch, server.draining)
        server.stats.batches += 1
        if got.accepted:  # their acks come when Kafka (or the spool) has them
            batch.parts = got.accepted
            self._parts_owed += got.accepted
            self._inflight_bytes += batch.size
            if self._inflight_bytes > server.security.limits.max_inflight_bytes_per_connection:
                server.security.stats.inflight_pauses += 1
                self._pause("inflight")
        if got.answered_now:
            # Listed (per-event) entries first, as the protocol asks; the
            # natively encoded ones (no indices) last.
            got.answers.sort(key=lambda e: not e.indices)
            body = encode_ack_body(got.batch_seq, got.answers, got.encoded, got.n_encoded, self.details)
            self._write(encode_frame(FrameType.ACK, body))

    def part_answered(self, batch: _InflightBatch, batch_seq: int, entry: AckEntry) -> None:
        """Answer one accepted part; ACK frames go out once per loop iteration."""
        self._parts_owed -= 1
        batch.parts -= 1
        if batch.parts == 0:
            self._inflight_bytes -= batch.size
            if "inflight" in self._paused_for and \
                    self._inflight_bytes <= self._server.security.limits.max_inflight_bytes_per_connection:
                self._resume("inflight")
        self._pending_acks.setdefault(batch_seq, []).append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        if self._state == _CLOSED or not self._pending_acks:
            return
        frames = [
            encode_frame(FrameType.ACK, encode_ack_body(seq, entries)) for seq, entries in self._pending_acks.items()
        ]
        self._pending_acks.clear()
        self._server.stats.acks_sent += len(frames)
        self._write(b"".join(frames))
        if self._eof and not self._parts_owed and self._transport is not None:
            self._transport.close()

    def send_goaway(self, reconnect_after_ms: int = 0) -> None:
        if self._state == _OPEN:
            self._write(Goaway(GoawayReason.SHUTTING_DOWN, reconnect_after_ms, "server is shutting down").encode())

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close_with_error(self, code: int, message: str, retry_after_ms: int = 0, linger_s: float = _LINGER_S) -> None:
        """Send an ERROR frame and close (FIN, a short linger for the peer to read it)."""
        if self._state == _CLOSED:
            return
        stats = self._server.stats
        stats.protocol_errors += 1
        stats.errors_by_code[code] = stats.errors_by_code.get(code, 0) + 1
        log.info("closing connection from %s (%s): %s: %s", self.peer, self.client_id or "-", error_name(code), message)
        self._write(ErrorFrame(code, message, retry_after_ms).encode())
        self._state = _CLOSED
        self.closed = True
        t = self._transport
        if t is None:
            return
        # Closing a socket with unread input makes the kernel send a reset,
        # which can destroy the ERROR frame before the peer reads it. So:
        # send FIN after the frame, discard what still comes in for a moment,
        # then close.
        if t.can_write_eof():
            t.write_eof()
        loop = asyncio.get_running_loop()
        loop.call_later(linger_s, t.close)
        loop.call_later(linger_s + _ABORT_AFTER_S, t.abort)  # a peer that does not read: do not wait for it
        self._server.connection_closed(self)  # no longer counted against the limits

    # what the listener asks

    def idle_since_before(self, cutoff: float) -> bool:
        """Nothing (not even a heartbeat) received since ``cutoff``, while we
        were reading (a connection we stopped reading cannot show us its heartbeats)."""
        return self.last_rx < cutoff and not self._paused_for and not self.closed

    def acks_unread_since_before(self, cutoff: float) -> bool:
        """Paused since before ``cutoff`` because the producer does not read its acks."""
        return "acks" in self._paused_for and not self.closed and self.paused_since.get("acks", 0) < cutoff

    def peer_hung_up(self) -> bool:
        """A connection we stopped reading never sees the peer's FIN on its
        own: ask the socket (POLLRDHUP, the peer shut down its side)."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None or not self._paused_for or self.closed:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def read_to_the_end(self) -> None:
        """The peer has finished sending: read what it sent before its FIN, so
        the end of stream is handled in order (owed ACKs are still written)."""
        self._paused_for.clear()
        if self._transport is not None and self._state != _CLOSED:
            self._transport.resume_reading()

    def drop(self) -> None:
        """Close at once, without a goodbye (the peer reads nothing anyway)."""
        self.closed = True
        self._state = _CLOSED
        self._server.connection_closed(self)
        self.abort()

    def reauthenticate(self) -> None:
        """A reload: check again what the connection presented at its HELLO;
        close it if that no longer passes, else apply its new type list."""
        if self._state != _OPEN:
            return
        security = self._server.security
        token, peercert = self._auth
        try:
            self.identity = security.authenticate(token, peercert)
        except AuthFailed as e:
            log.warning("closing connection from %s after the reload: %s", self.peer, e)
            self.close_with_error(ErrorCode.AUTH_FAILED, "authentication failed")
            return
        self.allowed = security.allowed(self.identity)

    def close(self) -> None:
        """Close after what is buffered (ACKs) has been written."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


