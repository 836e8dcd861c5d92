"""The daemon: registry, sink, router and listener wired together, with a
graceful stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import time

from eventbroker.config import Config, resolve_types
from eventbroker.embedded import EmbeddedKafka
from eventbroker.router import Router
from eventbroker.server import IngestServer
from eventbroker.sinks import KafkaSink, NullSink, Sink

log = logging.getLogger("eventbroker")


def _raise_nofile_limit() -> None:
    """One descriptor per producer connection: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("raised the open-files limit from %d to %d", soft, hard)


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.types = resolve_types(cfg)
        self.embedded: EmbeddedKafka | None = None
        self.sink: Sink | None = None
        self.router: Router | None = None
        self.server: IngestServer | None = None
        self.bootstrap = cfg.kafka.bootstrap_servers
        self._stopped = False

    async def start(self) -> None:
        kcfg = self.cfg.kafka
        _raise_nofile_limit()
        if not self.types:
            log.warning(
                "no event types configured: every event will be rejected as unknown_type. "
                "Add [types.<name>] sections to the config (see config/eventbroker.toml)"
            )
        if kcfg.sink == "null":
            self.sink = NullSink()
        else:
            if not self.bootstrap:
                self.embedded = EmbeddedKafka(port=kcfg.embedded_port)
                self.embedded.start()  # from this (main) thread: see embedded._die_with_parent
                self.bootstrap = self.embedded.bootstrap
                log.warning(
                    "no Kafka configured: started the embedded development broker (Tansu, memory storage) "
                    "on %s. For development only: its events are lost when it stops. "
                    "Use --kafka HOST:PORT or [kafka] bootstrap_servers for a real cluster.",
                    self.bootstrap,
                )
            self.sink = KafkaSink(kcfg, self.bootstrap)
        try:
            await self.sink.start(self.types)
            self.router = Router(self.types, self.sink, kcfg, self.cfg.server, self.cfg.spool)
            self.router.start()
            self.server = IngestServer(self.cfg.server, self.router)
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        # Everything allocated so far lives as long as the process: keep the
        # cyclic GC from scanning it on every full collection (latency tails).
        gc.freeze()
        log.info(
            "eventbroker ready: listening on %s, %d event types (%s), sink %s",
            ", ".join(self.server.addresses),
            len(self.types),
            ", ".join(sorted(self.types)),
            "null" if kcfg.sink == "null" else f"kafka {self.bootstrap}",
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + self.cfg.server.drain_timeout_ms / 1000
        if self.server is not None:
            await self.server.drain(deadline)
        if self.router is not None:
            await self.router.stop(deadline)
            if not self.router.idle:
                left = sum(lane.ring.used_bytes for lane in self.router.lanes.values())
                log.warning("drain deadline passed with %d bytes of unacknowledged events; producers resend them", left)
        if self.server is not None:
            await self.server.close()
        if self.sink is not None:
            await self.sink.stop()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        log.info("eventbroker stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: draining")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
