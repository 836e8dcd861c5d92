"""One connection of a producer to a gateway: frames in, callbacks to its producer."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Protocol, cast

from eventbroker import _fastpath as fp
from eventbroker.errors import ServerError
from eventbroker.protocol import Ack, ErrorCode, ErrorFrame, FrameType, Goaway, Welcome

log = logging.getLogger("eventbroker.client")


class ConnectionOwner(Protocol):
    """What a connection calls back into (the ``Producer``)."""

    @property
    def tls(self) -> ssl.SSLContext | None: ...

    def on_ack(self, ack: Ack) -> None: ...

    def on_goaway(self, conn: Connection) -> None: ...

    def on_writable(self, conn: Connection) -> None: ...

    def on_server_error(self, err: ErrorFrame) -> None: ...


def client_ssl(tls: bool | ssl.SSLContext, ca_file: str | None, cert_file: str | None,
                key_file: str | None) -> ssl.SSLContext | None:
    if isinstance(tls, ssl.SSLContext):
        return tls
    if not (tls or ca_file or cert_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Connection(asyncio.Protocol):
    def __init__(self, producer: ConnectionOwner) -> None:
        self.p = producer
        self.reader = fp.FrameReader(64 * 1024 * 1024)
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx = time.monotonic()
        self.goaway = False
        self.writable = True  # False while the transport's buffer is over its high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if not self.welcome.done() and self.p.tls is None and data[:1] in (b"\x15", b"\x16") and \
                data[1:2] == b"\x03":
            # A TLS record (alert or handshake) where a frame was expected.
            self.welcome.set_exception(ServerError(ErrorCode.BAD_HANDSHAKE, "the server speaks TLS: give the "
                                                   "producer tls=True (and ca_file) to connect"))
            self.close()
            return
        self.reader.feed(data)
        try:
            while (ft := self.reader.next_frame()) >= 0:
                body = self.reader.body()
                if ft == FrameType.ACK:
                    self.p.on_ack(Ack.decode(body))
                elif ft == FrameType.WELCOME:
                    if not self.welcome.done():
                        self.welcome.set_result(Welcome.decode(body))
                elif ft == FrameType.HEARTBEAT:
                    pass
                elif ft == FrameType.GOAWAY:
                    g = Goaway.decode(body)
                    log.info("server asked to reconnect elsewhere: %s", g.message)
                    self.goaway = True
                    self.p.on_goaway(self)
                elif ft == FrameType.ERROR:
                    err = ErrorFrame.decode(body)
                    self.p.on_server_error(err)
                    if not self.welcome.done():
                        self.welcome.set_exception(ServerError(err.code, err.message, err.retry_after_ms))
                    self.close()
                    return
        except Exception as e:
            log.warning("bad frame from server: %r; reconnecting", e)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            hint = "" if self.p.tls is not None else " (if the server uses TLS, connect with tls=True)"
            self.welcome.set_exception(ConnectionError(f"connection closed during the handshake{hint}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.p.on_writable(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
