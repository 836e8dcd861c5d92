"""The daemon: registry, sink, router, listener and admin endpoints wired
together, with a graceful stop on SIGTERM or SIGINT and a config reload on
SIGHUP (or, in a worker, on its supervisor's request)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import time
from pathlib import Path, PurePath

from eventbroker.config import (
    BUILT_IN_DEFAULTS,
    Config,
    load_config,
    reload_blockers,
    resolve_types,
    with_overrides,
)
from eventbroker.errors import ConfigError, KeyStoreError, SchemaError, SpoolError, SpoolLocked
from eventbroker.gateway.router import Router
from eventbroker.gateway.server import IngestServer
from eventbroker.kafka.embedded import EmbeddedKafka
from eventbroker.kafka.errors import KafkaError
from eventbroker.kafka.sink import KafkaSink, NullSink, Sink
from eventbroker.ops.addresses import ADMIN, PRODUCERS, PortLock, bind_failed
from eventbroker.ops.admin_http import AdminServer, Handler
from eventbroker.ops.logs import plural
from eventbroker.ops.metrics import DaemonMetrics
from eventbroker.privacy import KeyCache, load_keks, open_key_cache
from eventbroker.protocol import parse_host_port
from eventbroker.schema import load_registry
from eventbroker.security.policy import Security
from eventbroker.spool.adopt import SpoolAdopter
from eventbroker.spool.lane import SpoolLanes
from eventbroker.spool.layout import lock_slot, slot_dir

log = logging.getLogger("eventbroker")

_SPOOL_SLOTS = 4096


def _raise_nofile_limit() -> None:
    """One descriptor per producer connection: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("raised the open-files limit from %d to %d", soft, hard)


class Daemon:
    """One gateway process.

    ``config_path`` and ``overrides`` (the command line's) are kept so a
    reload reads the same file and applies the same overrides. A worker of
    ``serve --workers`` passes ``control_socket`` (its admin endpoints, with
    POST /reload, on a unix socket for the supervisor), ``worker_index`` and
    ``reuse_port``.
    """

    def __init__(self, cfg: Config, *, config_path: str | None = None, config_source: str | None = None,
                 overrides: dict | None = None,
                 control_socket: str | None = None, worker_index: int | None = None,
                 reuse_port: bool | None = None) -> None:
        self.cfg = cfg
        self.types = resolve_types(cfg)
        self.schemas = load_registry(cfg, self.types)  # SchemaError: refuse to start
        self.config_path = config_path
        # How the config is named in messages: a worker reads its supervisor's
        # copy of the user's file, but reports the user's file.
        self.config_source = config_source
        self.overrides = overrides or {}
        self.control_socket = control_socket
        self.worker_index = worker_index
        self.reuse_port = cfg.server.reuse_port if reuse_port is None else reuse_port
        self.embedded: EmbeddedKafka | None = None
        self.sink: Sink | None = None
        self.router: Router | None = None
        self.server: IngestServer | None = None
        self.security = Security(cfg.tls, cfg.auth, cfg.limits, self.types)
        self.keys: KeyCache | None = None  # users' data keys, when some type has personal fields
        self.metrics = DaemonMetrics(lambda: (self.router, self.server), lambda: self.keys)
        self.lanes: SpoolLanes | None = None
        self.admin: AdminServer | None = None
        self.control: AdminServer | None = None
        self.bootstrap = cfg.kafka.bootstrap_servers
        self._stopped = False
        self._slot_fd = -1
        self._slot_index = -1
        self._skip_slots: set[int] = set()
        self.adopter: SpoolAdopter | None = None
        self._adopter_task: asyncio.Task | None = None
        self._sink_task: asyncio.Task | None = None
        self._port_lock: PortLock | None = None

    async def start(self) -> None:
        kcfg = self.cfg.kafka
        _raise_nofile_limit()
        if self.control_socket is None:  # a worker's supervisor holds the port's lock
            listen = self.cfg.server.listen
            self._port_lock = PortLock(listen, parse_host_port(listen)[1])
            self._port_lock.acquire()
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
            try:
                await self.sink.start(self.types)
            except (KafkaError, OSError) as e:
                if not isinstance(self.sink, KafkaSink) or not any(t.ack == "spool" for t in self.types.values()):
                    raise
                # Spooled types are what keeps a gateway useful while Kafka is away.
                log.warning("Kafka unreachable at start (%r): spooled types are acknowledged from the spool, "
                            "the others answered retry-later, until it answers", e)
                self._sink_task = asyncio.get_running_loop().create_task(self.sink.start_when_reachable(self.types))
            if self.schemas.has_personal:
                await self._open_keys(self.cfg)
            self.router = self._make_router()
            self.metrics.attach(self.router.lanes)
            self.router.start()
            self._start_adopter()
            self.security = Security(self.cfg.tls, self.cfg.auth, self.cfg.limits, self.types)
            self.security.warn_if_open()
            self.server = IngestServer(self.cfg.server, self.router, self.security)
            try:
                await self.server.start(reuse_port=self.reuse_port)
            except OSError as e:
                raise bind_failed(PRODUCERS, self.cfg.server.listen, e) from None
            await self._start_admin()
        except BaseException:
            await self.stop()
            raise
        # Everything allocated so far lives as long as the process: keep the
        # cyclic GC from scanning it on every full collection (latency tails).
        gc.freeze()
        log.info(
            "eventbroker ready: listening on %s, %s, sink %s%s",
            ", ".join(self.server.addresses),
            f"{plural(len(self.types), 'event type')} ({', '.join(sorted(self.types))})" if self.types
            else "no event types",
            "null" if kcfg.sink == "null" else f"kafka {self.bootstrap}",
            f", admin on {self.admin.address}" if self.admin else "",
        )

    def _make_router(self) -> Router:
        assert self.sink is not None
        cfg = self.cfg
        while True:
            provider = self._spool_slot if self.worker_index is not None else None
            self.lanes = SpoolLanes(cfg.spool, root_provider=provider)
            try:
                return Router(self.types, self.sink, cfg.kafka, cfg.server, self.lanes, self.schemas,
                              self.keys.native if self.keys is not None else None)
            except SpoolLocked as e:
                # A type directory of the free slot is held by someone else
                # (`spool replay`, a daemon of an older layout): next slot.
                if self._slot_fd < 0:
                    raise
                log.warning("worker %s: %s; trying the next spool slot", self.worker_index, e)
                os.close(self._slot_fd)
                self._slot_fd = -1
                self._skip_slots.add(self._slot_index)

    async def _open_keys(self, cfg: Config) -> None:
        """The key cache (a KeyStoreError or ConfigError refuses the start, or the
        reload, naming the store or the KEK file)."""
        keys = await asyncio.get_running_loop().run_in_executor(None, open_key_cache, cfg)
        await keys.start()
        self.keys = keys
        log.info("personal fields are sealed with users' keys from %s", keys.uri)

    def _spool_slot(self) -> Path:
        """Workers share spool.dir: each holds the first free slot directory for
        its lifetime, taken when its first spooled type needs it. What a
        worker that is gone left in its slot is delivered by SpoolAdopter."""
        base = self.cfg.spool.resolved_dir()
        for slot in range(_SPOOL_SLOTS):
            if slot in self._skip_slots:
                continue
            path = slot_dir(base, slot)
            fd = lock_slot(path)
            if fd is not None:
                self._slot_fd = fd
                self._slot_index = slot
                log.info("worker %s: spool slot %s", self.worker_index, path)
                return path
        raise SpoolError(f"{base}: all {_SPOOL_SLOTS} spool slots are in use")

    def _start_adopter(self) -> None:
        assert self.router is not None and self.sink is not None and self.lanes is not None
        router, lanes = self.router, self.lanes
        self.adopter = SpoolAdopter(
            self.cfg.spool.resolved_dir(), lambda: lanes.root, router.spooled_type_names,
            self.sink, self.cfg.kafka, self.cfg.defaults, router.requests, self.cfg.spool.segment_bytes,
            self.cfg.spool.fsync, known=lambda: self.types)
        self._adopter_task = asyncio.get_running_loop().create_task(self.adopter.run())

    async def _start_admin(self) -> None:
        routes: dict[tuple[str, str], Handler] = {("GET", "/metrics"): self._http_metrics, ("GET", "/healthz"): self._http_healthz,
                  ("GET", "/readyz"): self._http_readyz}
        if self.control_socket:
            self.control = AdminServer({**routes, ("POST", "/reload"): self._http_reload})
            await self.control.start_unix(self.control_socket)
            os.chmod(self.control_socket, 0o600)  # the supervisor (same user) only
        elif self.cfg.server.admin_listen:
            host, port = parse_host_port(self.cfg.server.admin_listen)
            self.admin = AdminServer(routes)
            try:
                await self.admin.start_tcp(host, port)
            except OSError as e:
                raise bind_failed(ADMIN, self.cfg.server.admin_listen, e) from None

    # admin endpoints

    async def _http_metrics(self, _body: bytes) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

    async def _http_healthz(self, _body: bytes) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"alive\n"

    async def _http_readyz(self, _body: bytes) -> tuple[int, str, bytes]:
        why = await self.not_ready()
        return (503, "text/plain", f"not ready: {why}\n".encode()) if why else (200, "text/plain", b"ready\n")

    async def _http_reload(self, body: bytes) -> tuple[int, str, bytes]:
        path = body.decode(errors="replace") or None
        if path is not None and self.control_socket and \
                PurePath(path).parent != PurePath(self.control_socket).parent:
            return 400, "text/plain", b"a worker reloads only configs its supervisor put beside its socket\n"
        ok, msg = await self.reload(path)
        return (200 if ok else 409), "text/plain", (msg + "\n").encode()

    async def not_ready(self) -> str:
        """Why a load balancer should not send producers here now; empty when it should.

        Kafka unreachable makes a gateway unready, unless it has spooled types
        accepting events: those keep being acknowledged during the outage,
        which is what the spool is for."""
        if self.server is None or self._stopped:
            return "not started"
        if self.server.draining:
            return "draining"
        if self.sink is not None and not await self.sink.reachable():
            if self.router is not None and self.router.accepts_without_kafka():
                return ""
            return "Kafka unreachable"
        return ""

    # reload

    async def reload(self, path: str | None = None) -> tuple[bool, str]:
        """Re-read the config file (or ``path``); apply it if it is valid and reloadable."""
        path = path or self.config_path
        shown = self.config_source or path or BUILT_IN_DEFAULTS
        try:
            new = with_overrides(load_config(path), **self.overrides)
        except ConfigError as e:
            msg = f"config reload refused, the running config stays in force: {str(e).replace(str(path), shown)}"
            log.error("%s", msg)
            return False, msg
        blockers = reload_blockers(self.cfg, new)
        if blockers:
            msg = (f"config reload refused, the running config stays in force: changing {', '.join(blockers)} "
                   "needs a restart")
            log.error("%s", msg)
            return False, msg
        try:
            schemas = load_registry(new, resolve_types(new), running=self.schemas)
        except SchemaError as e:
            msg = f"config reload refused, the running config stays in force: {e}"
            log.error("%s", msg)
            return False, msg
        assert self.router is not None and self.server is not None
        kek_change = ""
        if schemas.has_personal and self.keys is None:
            try:
                await self._open_keys(new)
            except (ConfigError, KeyStoreError) as e:
                msg = f"config reload refused, the running config stays in force: {e}"
                log.error("%s", msg)
                return False, msg
            self.router.set_keys(self.keys.native if self.keys is not None else None)
        elif self.keys is not None:
            try:  # KEK rotation: a new KEK added, or made the one that wraps
                keks = load_keks(new.privacy)
            except ConfigError as e:
                msg = f"config reload refused, the running config stays in force: {e}"
                log.error("%s", msg)
                return False, msg
            if keks.keks != self.keys.keks.keks:
                kek_change = (f"key-encryption keys re-read: {keks.current.id} wraps, "
                              f"{', '.join(k.id for k in keks.keks)} unwrap")
            self.keys.keks = keks
        if self.lanes is not None:
            self.lanes.cfg = new.spool  # spooled types added by this reload
        try:
            changes = self.router.reconfigure(resolve_types(new), new.kafka, new.server, new.spool, schemas)
        except SpoolError as e:
            if self.lanes is not None:
                self.lanes.cfg = self.cfg.spool
            msg = f"config reload failed: {e}"
            log.error("%s", msg)
            return False, msg
        self.metrics.attach(self.router.lanes)
        self.server.cfg = new.server  # new connections get the new frame limits
        self.security.replace(new.auth, new.limits, resolve_types(new))
        self.server.reconfigured()
        self.cfg = new
        self.types = resolve_types(new)
        self.schemas = schemas
        if kek_change:
            changes.append(kek_change)
        msg = f"config reloaded from {shown}: " + ("; ".join(changes) if changes else "no changes")
        log.info("%s", msg)
        return True, msg

    # stopping

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + self.cfg.server.drain_timeout_ms / 1000
        if self._adopter_task is not None:
            self._adopter_task.cancel()
            await asyncio.gather(self._adopter_task, return_exceptions=True)
        if self.server is not None:
            await self.server.drain(deadline)
        if self.router is not None:
            await self.router.stop(deadline)
            if not self.router.idle:
                left = self.router.used_bytes
                log.warning("drain deadline passed with %d bytes of unacknowledged events; producers resend them", left)
        if self.server is not None:
            await self.server.close()
        if self.keys is not None:
            await self.keys.stop()
        for admin in (self.admin, self.control):
            if admin is not None:
                await admin.close()
        if self.control_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.control_socket)
        if self._sink_task is not None:
            self._sink_task.cancel()
            await asyncio.gather(self._sink_task, return_exceptions=True)
        if self.sink is not None:
            await self.sink.stop()
        if self._slot_fd >= 0:
            os.close(self._slot_fd)
            self._slot_fd = -1
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
            log.info("stopped the embedded broker")
        if self._port_lock is not None:
            self._port_lock.release()
        log.info("eventbroker stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task] = set()

        def on_hup() -> None:
            t = loop.create_task(self.reload())
            reloads.add(t)
            t.add_done_callback(reloads.discard)

        # A worker reloads and is replaced when its supervisor says so: it
        # starts with SIGHUP and SIGUSR2 ignored (supervisor._worker_preexec).
        if self.control_socket is None:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: draining")
        finally:
            try:
                await self.stop()  # handlers stay: a second SIGTERM must not kill a drain
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
