"""A fault-injecting TCP proxy for adversity tests (after asyncpg's test fuzzer).

Forwards bytes between clients and one upstream; ``stall()`` stops forwarding
in both directions (a hung network), ``cut()`` closes every connection and
refuses new ones (a partition), ``heal()`` returns to normal.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut = False
        self.connections = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, host, port)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stall(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        self._cut = True
        for w in list(self._writers):
            w.transport.abort()

    def heal(self) -> None:
        self._cut = False
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if self._cut or writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
