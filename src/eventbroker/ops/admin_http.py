"""A small HTTP/1.1 server for the admin endpoints: /metrics, /healthz, /readyz
(and, on a worker's private unix socket, POST /reload).

These are a handful of requests a second from Prometheus and a load balancer,
so a minimal asyncio handler is enough; it keeps a web framework out of the
daemon. Each request gets one response and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("eventbroker.admin")

Handler = Callable[[bytes], Awaitable[tuple[int, str, bytes]]]  # body -> (status, content type, body)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
_MAX_HEAD = 8192
_MAX_BODY = 1 << 20
# A few clients (Prometheus, a load balancer, `eventbroker status`) at a time.
# Past this many open connections the oldest one still waiting for its
# request head is dropped to make room (so idle sockets cannot lock out the
# health checks); a head must arrive within _HEAD_TIMEOUT_S, a response be
# taken within _WRITE_TIMEOUT_S.
_MAX_CONNECTIONS = 64
_HEAD_TIMEOUT_S = 2.0
_WRITE_TIMEOUT_S = 10.0


class AdminServer:
    """Routes ``(method, path)`` to handlers; listens on TCP or a unix socket."""

    def __init__(self, routes: Mapping[tuple[str, str], Handler]) -> None:
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None
        self.address = ""
        self.refused_connections = 0  # dropped to make room for new ones
        self._waiting: dict[asyncio.StreamWriter, float] = {}  # connections without a whole request head yet
        self._open: set[asyncio.StreamWriter] = set()

    async def start_tcp(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        addr = self._server.sockets[0].getsockname()
        self.address = f"{addr[0]}:{addr[1]}"

    async def start_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._handle, path)
        self.address = path

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= _MAX_CONNECTIONS and self._waiting:
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            self._waiting.pop(oldest)
            self.refused_connections += 1
            oldest.transport.abort()
        self._open.add(writer)
        self._waiting[writer] = asyncio.get_running_loop().time()
        try:
            await self._serve(reader, writer)
        finally:
            self._open.discard(writer)
            self._waiting.pop(writer, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
            self._waiting.pop(writer, None)
            status, ctype, body = await asyncio.wait_for(self._respond(request, reader), _WRITE_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()
        finally:
            writer.close()

    async def _respond(self, head: bytes, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        if len(head) > _MAX_HEAD:
            return 413, "text/plain", b"request head too large\n"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return 400, "text/plain", b"bad content-length\n"
        if length < 0 or length > _MAX_BODY:
            return 413, "text/plain", b"body too large\n"
        body = await reader.readexactly(length) if length else b""
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return 405, "text/plain", b"method not allowed\n"
            return 404, "text/plain", b"not found\n"
        try:
            return await handler(body)
        except Exception:
            log.exception("admin endpoint %s %s failed", method, path)
            return 500, "text/plain", b"internal error\n"


async def http_request(address: str, method: str, path: str, body: bytes = b"",
                       timeout_s: float = 5.0) -> tuple[int, bytes]:
    """One request to an admin endpoint (``host:port`` or a unix socket path)."""

    async def go() -> tuple[int, bytes]:
        if address.startswith("/"):
            reader, writer = await asyncio.open_unix_connection(address)
            host = "localhost"
        else:
            h, _, p = address.rpartition(":")
            reader, writer = await asyncio.open_connection(h.strip("[]"), int(p))
            host = address
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, rest

    return await asyncio.wait_for(go(), timeout_s)
