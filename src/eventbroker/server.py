"""The asyncio TCP listener: one ``IngestProtocol`` per producer connection.

``data_received`` feeds the bytes to the native ``FrameReader`` and hands each
EVENT_BATCH frame to the native router: Python does per-frame work only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, cast

from eventbroker import _fastpath as fp
from eventbroker.auth import AuthFailed, Identity
from eventbroker.config import (
    AuthConfig,
    LimitsConfig,
    ServerConfig,
    TlsConfig,
    default_server_id,
    parse_host_port,
)
from eventbroker.errors import ProtocolError
from eventbroker.protocol import (
    Ack,
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
    encode_ack_body,
    encode_frame,
    encode_heartbeat,
    error_name,
)
from eventbroker.router import Router
from eventbroker.security import Security, is_loopback

log = logging.getLogger("eventbroker.server")

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2
_LINGER_S = 1.0
_TOO_MANY_FAILURES = "too many failed handshakes from this address; retry in a minute"
# Framing errors before the handshake mean the peer does not speak this protocol.
_NOT_OUR_PROTOCOL = {ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_FRAME_TYPE, ErrorCode.MALFORMED_FRAME}


class ServerStats:
    __slots__ = ("connections", "connections_total", "protocol_errors", "batches", "acks_sent", "rejected",
                 "retry_later", "errors_by_code")

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        self.protocol_errors = 0
        self.batches = 0
        self.acks_sent = 0
        # (type name, reason) -> events; names of unconfigured types are not
        # kept (producers choose them): they count under "<unknown>".
        self.rejected: dict[tuple[str, int], int] = {}
        self.retry_later: dict[tuple[str, int], int] = {}
        self.errors_by_code: dict[int, int] = {}  # ERROR frames sent, by code


class IngestProtocol(asyncio.Protocol):
    """One producer connection."""

    def __init__(self, server: IngestServer) -> None:
        self._server = server
        self._reader = fp.FrameReader(server.cfg.max_frame_bytes)
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
        self.last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._inflight_bytes = 0  # bytes of batches with parts not yet answered
        self._batch_bytes: dict[int, list[int]] = {}  # seq -> [bytes, parts owed]
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
            self._fatal(*refusal)
            return
        limits = self._server.security.limits
        self._timer = loop.call_later(limits.handshake_timeout_ms / 1000, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if self._state == _HANDSHAKE:
            self._server.security.stats.handshake_timeouts += 1
            self._fatal(ErrorCode.TIMEOUT, "no HELLO within the handshake timeout")

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        reader = self._reader
        reader.feed(data)
        try:
            while True:
                ftype = reader.next_frame()
                if ftype < 0:
                    return
                self.last_rx = self._server.now()  # whole frames only: trickled bytes do not count
                if ftype == FrameType.EVENT_BATCH and self._state == _OPEN:
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
                self._fatal(ErrorCode.BAD_HANDSHAKE, f"not an eventbroker v1 stream, expected HELLO: {e.message}")
            else:
                self._fatal(e.code, e.message)
        except Exception:  # a bug here must not take the daemon down
            log.exception("internal error on connection from %s", self.peer)
            # Rings may hold events of this batch with no segment to answer for
            # them; hand everything back (retry-later) so no ack is ever wrong.
            for lane in self._server.router.lanes.values():
                lane.shed("internal error while accepting a batch")
            self._fatal(ErrorCode.INTERNAL, "internal error")

    def eof_received(self) -> bool | None:
        if self._state != _CLOSED and self._reader.buffered_bytes:
            self._fatal(
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

    def connection_lost(self, exc: Exception | None) -> None:
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
        if security.refused(self.addr):  # failures on connections opened before the limit was reached
            security.stats.auth_refused_addresses += 1
            raise ProtocolError(ErrorCode.AUTH_FAILED, _TOO_MANY_FAILURES)
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
        self._write(
            Welcome(
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
        seq, names, results = server.router.core.ingest(self._reader, int(time.time() * 1000), self.allowed)
        server.stats.batches += 1
        parts_before = self._parts_owed
        now_entries = []
        for ti, status, reason, count, indices, ring in results:
            if ring is not None:  # accepted: the ack comes when Kafka has it
                ring.lane.add_segment(self, seq, ti, count)
                self._parts_owed += 1
                continue
            lane = server.router.lane_for(names[ti])
            key = (lane.etype.name if lane is not None else "<unknown>", reason)
            counts = server.stats.rejected if status == Status.REJECTED else server.stats.retry_later
            counts[key] = counts.get(key, 0) + count
            retry_ms = 0
            if status == Status.RETRY_LATER:
                if reason in (Reason.KAFKA_UNAVAILABLE, Reason.SPOOL_UNAVAILABLE) and lane is not None:
                    retry_ms = lane.retry_after_ms
                else:
                    retry_ms = 200
                    if server.draining:
                        reason = Reason.SHUTTING_DOWN
            now_entries.append(AckEntry(ti, status, reason, count, retry_ms, tuple(indices or ())))
        owed = self._parts_owed - parts_before
        if owed:
            size = self._reader.body_length
            self._batch_bytes[seq] = [size, owed]
            self._inflight_bytes += size
            if self._inflight_bytes > server.security.limits.max_inflight_bytes_per_connection:
                server.security.stats.inflight_pauses += 1
                self._pause("inflight")
        if now_entries or not results:
            # Listed (per-event) entries first, as the protocol asks. A batch
            # with no events is answered with an empty ACK.
            now_entries.sort(key=lambda e: not e.indices)
            self._write(Ack(seq, tuple(now_entries)).encode())

    def part_persisted(self, batch_seq: int, type_index: int, count: int) -> None:
        self._queue_ack(batch_seq, AckEntry(type_index, Status.PERSISTED, Reason.NONE, count))

    def part_retry(self, batch_seq: int, type_index: int, count: int, reason: int, retry_after_ms: int) -> None:
        """An accepted part could not be delivered: the producer must send it again."""
        self._queue_ack(batch_seq, AckEntry(type_index, Status.RETRY_LATER, reason, count, retry_after_ms))

    def _queue_ack(self, batch_seq: int, entry: AckEntry) -> None:
        """Answer one accepted part; ACK frames go out once per loop iteration."""
        self._parts_owed -= 1
        owed = self._batch_bytes.get(batch_seq)
        if owed is not None:
            owed[1] -= 1
            if owed[1] == 0:
                del self._batch_bytes[batch_seq]
                self._inflight_bytes -= owed[0]
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

    def _fatal(self, code: int, message: str) -> None:
        if self._state == _CLOSED:
            return
        stats = self._server.stats
        stats.protocol_errors += 1
        stats.errors_by_code[code] = stats.errors_by_code.get(code, 0) + 1
        log.info("closing connection from %s (%s): %s: %s", self.peer, self.client_id or "-", error_name(code), message)
        self._write(ErrorFrame(code, message).encode())
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
        loop.call_later(_LINGER_S, t.close)
        loop.call_later(_LINGER_S + 5, t.abort)  # a peer that does not read: do not wait for it
        self._server.connection_closed(self)  # no longer counted against the limits

    def close(self) -> None:
        """Close after what is buffered (ACKs) has been written."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class IngestServer:
    """The listening socket and its connections."""

    def __init__(self, cfg: ServerConfig, router: Router, security: Security | None = None) -> None:
        self.cfg = cfg
        self.router = router
        self.security = security or Security(TlsConfig(), AuthConfig(), LimitsConfig(), router.lanes)
        self.server_id = cfg.server_id or default_server_id()
        self.stats = ServerStats()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._conns: set[IngestProtocol] = set()
        self._per_addr: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def start(self, **kw: Any) -> None:
        host, port = parse_host_port(self.cfg.listen)
        loop = self._loop = asyncio.get_running_loop()
        ctx = self.security.ssl_context()
        if ctx is not None:
            kw["ssl"] = ctx
            kw["ssl_handshake_timeout"] = self.security.limits.handshake_timeout_ms / 1000
        self._server = await loop.create_server(
            lambda: IngestProtocol(self), host, port, reuse_address=True, backlog=4096, **kw
        )
        self._sweeper = loop.create_task(self._sweep_idle())
        tls = self.security.tls
        if ctx is not None:
            log.info("listening on %s (TLS %s+, client certificates %s)", ", ".join(self.addresses),
                     tls.min_version, tls.client_auth)
        elif is_loopback(host):
            log.info("listening on %s (plaintext, loopback only)", ", ".join(self.addresses))
        else:
            log.warning("listening on %s in PLAINTEXT: events and tokens cross the network unencrypted; "
                        "set [tls] cert_file and key_file", ", ".join(self.addresses))

    async def _sweep_idle(self) -> None:
        """Close connections that sent nothing (not even a heartbeat) for idle_timeout_ms."""
        while True:
            idle_s = self.security.limits.idle_timeout_ms / 1000
            await asyncio.sleep(min(1.0, idle_s / 4))
            cutoff = self.now() - idle_s
            # A connection we stopped reading (back-pressure) cannot show us its heartbeats.
            for conn in [c for c in self._conns if c.last_rx < cutoff and not c._paused_for and not c.closed]:
                self.security.stats.idle_timeouts += 1
                conn._fatal(ErrorCode.TIMEOUT, f"nothing received for {idle_s:.0f}s (idle timeout)")
            # One that has not read its acks for as long: it will not; drop it.
            for conn in [c for c in self._conns if "acks" in c._paused_for and not c.closed
                         and c.paused_since.get("acks", 0) < cutoff]:
                self.security.stats.idle_timeouts += 1
                log.info("closing connection from %s: it has not read its acks for %.0fs", conn.peer, idle_s)
                conn.closed = True
                conn._state = _CLOSED
                self.connection_closed(conn)
                conn.abort()

    @property
    def addresses(self) -> list[str]:
        if self._server is None:
            return []
        out = []
        for s in self._server.sockets:
            addr = s.getsockname()
            out.append(f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}")
        return out

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def connection_opened(self, conn: IngestProtocol) -> tuple[int, str] | None:
        """Count a new connection; returns (error code, message) to refuse it with."""
        self._conns.add(conn)
        self.stats.connections = len(self._conns)
        self.stats.connections_total += 1
        n = self._per_addr[conn.addr] = self._per_addr.get(conn.addr, 0) + 1
        sec = self.security
        if sec.refused(conn.addr):
            sec.stats.auth_refused_addresses += 1
            return ErrorCode.AUTH_FAILED, _TOO_MANY_FAILURES
        if len(self._conns) > sec.limits.max_connections:
            sec.stats.refused_total_limit += 1
            return ErrorCode.CONNECTION_LIMIT, f"server at its connection limit ({sec.limits.max_connections})"
        if n > sec.limits.max_connections_per_address and conn.addr not in sec.trusted:
            sec.stats.refused_address_limit += 1
            return (ErrorCode.CONNECTION_LIMIT,
                    f"too many connections from this address (limit {sec.limits.max_connections_per_address})")
        return None

    def connection_closed(self, conn: IngestProtocol) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            n = self._per_addr.get(conn.addr, 1) - 1
            if n > 0:
                self._per_addr[conn.addr] = n
            else:
                self._per_addr.pop(conn.addr, None)
        self.stats.connections = len(self._conns)

    def reconfigured(self) -> None:
        """After a reload every open connection is authenticated again with what
        it presented: one that no longer passes (its token hash removed, auth
        now required, its certificate no longer named) is closed; the others
        get their producer's new type list."""
        for conn in list(self._conns):
            if conn._state != _OPEN:
                continue
            token, peercert = conn._auth
            try:
                conn.identity = self.security.authenticate(token, peercert)
            except AuthFailed as e:
                log.warning("closing connection from %s after the reload: %s", conn.peer, e)
                conn._fatal(ErrorCode.AUTH_FAILED, "authentication failed")
                continue
            conn.allowed = self.security.allowed(conn.identity)

    async def drain(self, deadline: float) -> None:
        """Stop accepting, ask producers to go elsewhere, finish their batches."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.send_goaway()
        # Ring fill is a counter kept in C; polling it only happens while stopping.
        while not self.router.idle and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def close(self, grace_s: float = 2.0) -> None:
        for conn in list(self._conns):
            conn.close()
        deadline = time.monotonic() + grace_s
        while self._conns and time.monotonic() < deadline:  # noqa: ASYNC110 - stopping only
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
