"""The asyncio TCP listener: the producer port, its connections and their limits."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from eventbroker.config import AuthConfig, LimitsConfig, ServerConfig, TlsConfig
from eventbroker.config.schema import default_server_id
from eventbroker.gateway.connection import Connection, ConnectionStats
from eventbroker.gateway.router import Router
from eventbroker.kafka.writer import drain_until
from eventbroker.protocol import ErrorCode, parse_host_port
from eventbroker.security.policy import Security
from eventbroker.security.tls import is_loopback

log = logging.getLogger("eventbroker.server")


class IngestServer:
    """The listening socket and its connections."""

    def __init__(self, cfg: ServerConfig, router: Router, security: Security | None = None) -> None:
        self.cfg = cfg
        self.router = router
        self.security = security or Security(TlsConfig(), AuthConfig(), LimitsConfig(), router.lanes)
        self.server_id = cfg.server_id or default_server_id()
        self.stats = ConnectionStats()
        self.draining = False
        self.handshake_bytes = 0
        self._server: asyncio.Server | None = None
        self._conns: set[Connection] = set()
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
            lambda: Connection(self), host, port, reuse_address=True, backlog=4096, **kw
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
            try:
                self._sweep(idle_s)
            except Exception:  # a bug here must not end idle timeouts for good
                log.exception("the idle sweep failed")

    def _sweep(self, idle_s: float) -> None:
        cutoff = self.now() - idle_s
        for conn in [c for c in self._conns if c.idle_since_before(cutoff)]:
            self.security.stats.idle_timeouts += 1
            conn.close_with_error(ErrorCode.TIMEOUT, f"nothing received for {idle_s:.0f}s (idle timeout)")
        # One that has not read its acks for as long: it will not; drop it.
        for conn in [c for c in self._conns if c.acks_unread_since_before(cutoff)]:
            self.security.stats.idle_timeouts += 1
            log.info("closing connection from %s: it has not read its acks for %.0fs", conn.peer, idle_s)
            conn.drop()
        # A peer that hung up while we were not reading it: read its last
        # bytes and its end of stream (then the idle rule above applies).
        for conn in [c for c in self._conns if c.peer_hung_up()]:
            conn.read_to_the_end()

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

    def connection_opened(self, conn: Connection) -> tuple[int, str] | tuple[int, str, int] | None:
        """Count a new connection; returns (error code, message) to refuse it with."""
        self._conns.add(conn)
        self.stats.connections = len(self._conns)
        self.stats.connections_total += 1
        n = self._per_addr[conn.addr] = self._per_addr.get(conn.addr, 0) + 1
        sec = self.security
        locked = sec.locked_out(conn.addr)
        if locked is not None:
            return locked
        if len(self._conns) > sec.limits.max_connections:
            sec.stats.refused_total_limit += 1
            return ErrorCode.CONNECTION_LIMIT, f"server at its connection limit ({sec.limits.max_connections})"
        if n > sec.limits.max_connections_per_address and conn.addr not in sec.trusted:
            sec.stats.refused_address_limit += 1
            return (ErrorCode.CONNECTION_LIMIT,
                    f"too many connections from this address (limit {sec.limits.max_connections_per_address})")
        return None

    def connection_closed(self, conn: Connection) -> None:
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
            conn.reauthenticate()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, ask producers to go elsewhere, finish their batches."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.send_goaway()
        await drain_until(lambda: self.router.idle, deadline, lambda: None)

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
