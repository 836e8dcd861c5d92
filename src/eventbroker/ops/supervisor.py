"""``eventbroker serve --workers N``: one small supervisor, N worker processes.

Each worker is a whole daemon (``Daemon``: its own uvloop loop, fast path and
Kafka connections) started as ``eventbroker serve --worker-of ...``. All
workers bind the producer port with SO_REUSEPORT, so the kernel spreads new
connections over them. The supervisor:

- starts the embedded development broker once, when no Kafka is configured;
- restarts a worker that dies, with back-off (1 s doubling to 30 s; reset
  after a minute of health), and logs and counts it;
- on SIGHUP validates the config and has every worker reload it (POST
  /reload on the worker's private unix socket); an invalid config is refused
  with a log line and the running one stays;
- on SIGUSR2 replaces all workers without downtime: a new generation starts
  and binds the port, and only when every new worker listens is the old
  generation told to drain (GOAWAY to producers, finish, exit). New code
  installed since the start is loaded by the new workers;
- on SIGTERM / SIGINT drains every worker and exits;
- serves /metrics (every worker's, merged, with a ``worker`` label, plus its
  own), /healthz and /readyz on ``server.admin_listen``;
- speaks systemd's notify protocol: READY, RELOADING, STOPPING, STATUS and
  WATCHDOG (when the unit sets WatchdogSec).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from eventbroker.config import (
    BUILT_IN_DEFAULTS,
    Config,
    load_config,
    reload_blockers,
    resolve_types,
    with_overrides,
)
from eventbroker.errors import ConfigError, UsageError
from eventbroker.kafka.embedded import EmbeddedKafka
from eventbroker.ops import sdnotify
from eventbroker.ops.addresses import ADMIN, PortLock, bind_failed, check_bindable
from eventbroker.ops.admin_http import AdminServer, Handler, http_request
from eventbroker.ops.logs import plural
from eventbroker.protocol import parse_host_port
from eventbroker.schema import load_registry

log = logging.getLogger("eventbroker.supervisor")

_PR_SET_PDEATHSIG = 1
_BACKOFF_S = (1.0, 30.0)
_HEALTHY_RESET_S = 60.0
_START_TIMEOUT_S = 120.0
_HEALTH_EVERY_S = 2.0
_CHECK_TIMEOUT_S = 0.8
_READY_TIMEOUT_S = 0.5  # under a load balancer's usual 1 s check timeout


def _worker_preexec() -> None:
    # A worker outlives a supervisor killed with -9 by at most a drain: it gets SIGTERM.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # Reloads and replacements go through the supervisor; the same signals
    # sent to the whole group (a terminal hangup, `systemctl kill` without
    # --kill-whom=main) must not kill workers. Ignored signals stay ignored
    # across exec.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class Worker:
    index: int
    generation: int
    control: str
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    retiring: bool = False
    restarts: int = 0
    backoff_s: float = _BACKOFF_S[0]
    task: asyncio.Task | None = field(default=None, repr=False)
    healthy_at: float = 0.0  # last time /healthz answered
    failed_checks: int = 0
    version: int = 0  # the config version it runs


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict, n_workers: int,
                 log_format: str, verbose: bool) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = dict(overrides)
        self.n = n_workers
        self.log_format = log_format
        self.verbose = verbose
        self.workers: list[Worker] = []
        self.generation = 0
        self.embedded: EmbeddedKafka | None = None
        self.runtime_dir = ""
        self._config_copy = 0  # of the config (and schemas) copied for workers
        self._candidate_copy = self._committed_copy = 0  # the copy being tried, the copy in force
        # The schemas in force (checked at start: a bad one stops `serve`
        # before any worker starts) and those of the config being tried.
        self._schemas = load_registry(cfg, resolve_types(cfg))
        self._candidate_schemas = self._schemas
        self.admin: AdminServer | None = None
        self.stopping = False
        self.worker_restarts = 0
        self.reloads = 0
        self.restarts_done = 0
        self.last_swap_s = 0.0
        self._stop = asyncio.Event()
        self._busy = asyncio.Lock()  # one reload or swap at a time
        self._bg: set[asyncio.Task] = set()
        self._scrape_lock = asyncio.Lock()
        self._scraped_at = 0.0
        self._scraped = b""
        self.snapshot = ""
        self._own_runtime_dir = ""
        self.version = 0  # of the config in force; +1 per reload or replacement

    # lifecycle

    async def run(self) -> int:
        listen = self.cfg.server.listen
        host, port = parse_host_port(listen)
        if port == 0:
            raise UsageError("serve --workers needs a fixed server.listen port (the workers share it)")
        lock = PortLock(listen, port)
        lock.acquire()  # one gateway per port: before anything binds or starts
        try:
            check_bindable(host, port, listen)
            return await self._run()
        finally:
            lock.release()

    async def _run(self) -> int:
        kcfg = self.cfg.kafka
        if kcfg.sink == "kafka" and not kcfg.bootstrap_servers and "kafka" not in self.overrides:
            self.embedded = EmbeddedKafka(port=kcfg.embedded_port)
            await asyncio.get_running_loop().run_in_executor(None, self.embedded.start)
            self.overrides["kafka"] = self.embedded.bootstrap
            self.cfg = with_overrides(self.cfg, kafka=self.embedded.bootstrap)  # as reloads will load it
            log.warning("no Kafka configured: started the embedded development broker (Tansu, memory storage) on "
                        "%s for the workers. For development only: its events are lost when it stops. "
                        "Use --kafka HOST:PORT or [kafka] bootstrap_servers for a real cluster.",
                        self.embedded.bootstrap)
        self.runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if not self.runtime_dir:
            self.runtime_dir = self._own_runtime_dir = tempfile.mkdtemp(prefix="eventbroker-")
        self._snapshot_config()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._spawn(self.restart_workers()))
        watchdog: asyncio.Task | None = None
        health: asyncio.Task | None = None
        try:
            await self._start_admin()
            t0 = time.monotonic()
            async with self._busy:  # a SIGHUP or SIGUSR2 now waits for the start
                gen = await self._start_generation(self.snapshot)
                if not await self._wait_listening(gen, _START_TIMEOUT_S):
                    raise UsageError("workers did not start; see their log lines above")
            health = loop.create_task(self._check_health())
            log.info("eventbroker ready: %s on %s (started in %.1fs)%s", plural(self.n, "worker"), self.cfg.server.listen,
                     time.monotonic() - t0, f", admin on {self.admin.address}" if self.admin else "")
            sdnotify.notify("READY=1", f"STATUS=serving with {plural(self.n, 'worker')} on {self.cfg.server.listen}")
            interval = sdnotify.watchdog_interval_s()
            if interval:
                watchdog = loop.create_task(self._watchdog(interval))
            await self._stop.wait()
        finally:
            self.stopping = True
            sdnotify.notify("STOPPING=1", "STATUS=draining")
            if self.workers:
                why = "signal received" if self._stop.is_set() else "stopping"
                log.info("%s: draining %s", why, plural(len(self.workers), "worker"))
            for t in (watchdog, health):
                if t is not None:
                    t.cancel()
            await self._stop_workers(list(self.workers))
            if self.admin is not None:
                await self.admin.close()
            if self.embedded is not None:
                self.embedded.stop()
                log.info("stopped the embedded broker")
            if self._own_runtime_dir:
                shutil.rmtree(self._own_runtime_dir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(sig)
            log.info("eventbroker stopped")
        return 0

    def _snapshot_config(self) -> None:
        """Workers read the last config the supervisor accepted, not the file
        itself: a worker restarted while the file is being edited (or broken)
        starts with the config in force. The same holds for the event
        schemas the config names: they are copied too."""
        self.snapshot = os.path.join(self.runtime_dir, "config.toml")
        self._commit_candidate(self._candidate(self.cfg))

    def _candidate(self, cfg: Config) -> str:
        """``cfg`` (the file as parsed, with the command line's overrides,
        which workers apply again) for workers to try, its schemas folder
        copied beside it under a new name."""
        self._config_copy += 1
        self._candidate_copy = self._config_copy
        schemas = os.path.join(self.runtime_dir, f"schemas-{self._config_copy}")
        if os.path.isdir(cfg.schemas.dir):
            shutil.copytree(cfg.schemas.dir, schemas, symlinks=False)
        cfg = msgspec.structs.replace(cfg, schemas=msgspec.structs.replace(cfg.schemas, dir=schemas))
        path = os.path.join(self.runtime_dir, "config.next.toml")
        with open(path, "wb") as f:  # noqa: ASYNC230 - a few kB, at start and reload
            f.write(msgspec.toml.encode(cfg))
        return path

    def _commit_candidate(self, path: str) -> None:
        os.replace(path, self.snapshot)
        self._committed_copy = self._candidate_copy
        self._drop_schema_copies(keep=self._committed_copy)

    def _drop_schema_copies(self, keep: int) -> None:
        keep_name = f"schemas-{keep}"
        for name in os.listdir(self.runtime_dir):
            if name.startswith("schemas-") and name != keep_name:
                shutil.rmtree(os.path.join(self.runtime_dir, name), ignore_errors=True)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 while the supervisor runs and a worker answered its health
        check within the last 10 s (so a node whose workers all hang or keep
        dying is restarted by systemd)."""
        while True:
            now = time.monotonic()
            if any(now - w.healthy_at < 10 for w in self.workers):
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _check_health(self) -> None:
        """A worker that does not answer /healthz three times in a row (hung,
        stopped) is killed and, by _keep_running, started again."""
        while True:
            await asyncio.sleep(_HEALTH_EVERY_S)
            live = self._live()
            answers = await asyncio.gather(*(http_request(w.control, "GET", "/healthz", timeout_s=_CHECK_TIMEOUT_S)
                                             for w in live), return_exceptions=True)
            now = time.monotonic()
            for w, a in zip(live, answers, strict=True):
                if isinstance(a, tuple) and a[0] == 200:
                    w.healthy_at = now
                    w.failed_checks = 0
                    continue
                if now - w.started < _START_TIMEOUT_S and not w.healthy_at:
                    continue  # still starting
                w.failed_checks += 1
                if w.failed_checks >= 3 and w.proc is not None and w.proc.returncode is None:
                    log.error("worker %d (pid %d) failed 3 health checks in a row; killing it", w.index, w.proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                    w.failed_checks = 0

    # workers

    async def _start_generation(self, config: str) -> list[Worker]:
        gen = self.generation = self.generation + 1
        workers = [Worker(i, gen, os.path.join(self.runtime_dir, f"worker-{gen}-{i}.sock")) for i in range(self.n)]
        for w in workers:
            self.workers.append(w)
            w.task = asyncio.get_running_loop().create_task(self._keep_running(w, config))
        return workers

    def _command(self, w: Worker, config: str) -> list[str]:
        cmd = [sys.executable, "-m", "eventbroker.cli", "--log-format", self.log_format]
        if self.verbose:
            cmd.append("-v")
        cmd += ["serve", "--worker-of", str(os.getpid()), "--worker-index", str(w.index),
                "--control-socket", w.control]
        cmd += ["--config", config, "--config-source", self.config_path or BUILT_IN_DEFAULTS]
        for k in ("listen", "kafka", "sink"):
            if self.overrides.get(k) is not None:
                cmd += [f"--{k}", self.overrides[k]]
        return cmd

    async def _keep_running(self, w: Worker, config: str) -> None:
        """Run worker ``w``; start it again (with back-off) whenever it dies unasked.
        The first start reads ``config``; restarts read the config in force."""
        env = {**os.environ, "EVENTBROKER_WORKER": str(w.index)}
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        while not self.stopping and not w.retiring:
            w.version = self.version if config == self.snapshot else self.version + 1
            w.proc = await asyncio.create_subprocess_exec(*self._command(w, config), env=env,
                                                          preexec_fn=_worker_preexec)
            config = self.snapshot
            w.started = time.monotonic()
            w.healthy_at = 0.0  # a new process: it has answered nothing yet
            w.failed_checks = 0
            if self.stopping or w.retiring:  # asked to stop while it was being started
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
            code = await w.proc.wait()
            if self.stopping or w.retiring:
                return
            up = time.monotonic() - w.started
            if up > _HEALTHY_RESET_S:
                w.backoff_s = _BACKOFF_S[0]
            w.restarts += 1
            self.worker_restarts += 1
            log.error("worker %d (pid %d) exited with %s after %.1fs; starting it again in %.0fs",
                      w.index, w.proc.pid, code, up, w.backoff_s)
            await asyncio.sleep(w.backoff_s)
            w.backoff_s = min(w.backoff_s * 2, _BACKOFF_S[1])

    async def _wait_listening(self, workers: list[Worker], timeout_s: float) -> bool:
        """True once every worker answers /healthz (it answers after it listens);
        False at once when one of them dies first."""
        deadline = time.monotonic() + timeout_s
        pending = list(workers)
        while pending and time.monotonic() < deadline and not self._stop.is_set():
            if any(w.restarts or (w.proc is not None and w.proc.returncode is not None) for w in workers):
                return False
            for w in list(pending):
                with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                    status, _ = await http_request(w.control, "GET", "/healthz", timeout_s=1)
                    if status == 200:
                        pending.remove(w)
                        w.healthy_at = time.monotonic()
            if pending:
                await asyncio.sleep(0.05)
        return not pending

    async def _stop_workers(self, workers: list[Worker]) -> None:
        for w in workers:
            w.retiring = True
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        grace = self.cfg.server.drain_timeout_ms / 1000 + 15
        for w in workers:
            if w.task is not None and (w.proc is None or w.proc.returncode is not None):
                w.task.cancel()  # waiting out a restart back-off
            if w.proc is not None:
                try:
                    await asyncio.wait_for(w.proc.wait(), grace)
                except TimeoutError:
                    log.error("worker %d did not stop within %.0fs; killing it", w.index, grace)
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                    await w.proc.wait()
            if w.task is not None:
                await asyncio.gather(w.task, return_exceptions=True)
            with contextlib.suppress(ValueError):
                self.workers.remove(w)

    # reload and restart

    def _load(self) -> Config | None:
        """The config file and the schemas it names, checked here (so a
        refusal names the user's files, not the workers' copies)."""
        try:
            cfg = with_overrides(load_config(self.config_path), **self.overrides)
            self._candidate_schemas = load_registry(cfg, resolve_types(cfg), running=self._schemas)
            return cfg
        except ConfigError as e:
            log.error("config reload refused, the running config stays in force: %s", e)
            return None

    async def reload(self) -> bool:
        async with self._busy:
            sdnotify.notify("RELOADING=1", sdnotify.monotonic_usec())
            try:
                return await self._reload()
            finally:
                sdnotify.notify("READY=1")

    async def _reload(self) -> bool:
        new = self._load()
        if new is None:
            return False
        blockers = reload_blockers(self.cfg, new)
        if blockers:
            log.error("config reload refused, the running config stays in force: changing %s needs a "
                      "restart", ", ".join(blockers))
            return False
        # Workers that have answered a health check since they started; the
        # others (starting now) are brought up to date after the commit.
        live = [w for w in self._live() if w.healthy_at > w.started]
        if not live:
            log.error("config reload refused: no worker is running")
            return False
        candidate = self._candidate(new)
        results = await asyncio.gather(*(self._reload_worker(w, candidate) for w in live))
        refused = [w for w, r in zip(live, results, strict=True) if r == "refused"]
        if not refused:
            self._commit_candidate(candidate)
            self.cfg = new
            self._schemas = self._candidate_schemas
            self.version += 1
            self.reloads += 1
            for w, r in zip(live, results, strict=True):
                if r == "applied":
                    w.version = self.version
            log.info("config reloaded by %s", plural(results.count("applied"), "worker"))
            await self._bring_up_to_date()
            return True
        # A worker refused: the ones that applied it go back to the config in force.
        applied = [w for w, r in zip(live, results, strict=True) if r == "applied"]
        back = await asyncio.gather(*(self._reload_worker(w, self.snapshot) for w in applied))
        self._drop_schema_copies(keep=self._committed_copy)
        log.error("config reload refused by %d of %d workers; the running config stays in force",
                  len(refused), len(live))
        unknown = [w for w, r in zip(live, results, strict=True) if r == "no answer"]
        unknown += [w for w, r in zip(applied, back, strict=True) if r != "applied"]
        for w in unknown:  # its config is unknown: drain it; it restarts from the config in force
            self._replace(w, "its config could not be brought back")
        return False

    async def _bring_up_to_date(self) -> None:
        """After a commit: workers that missed the reload (no answer, or started
        from the previous config meanwhile) are replaced, gracefully: they
        restart from the config now in force."""
        for w in self._live():
            if w.version < self.version:
                self._replace(w, "it did not apply the reload")

    def _replace(self, w: Worker, why: str) -> None:
        if w.proc is not None and w.proc.returncode is None:
            log.warning("restarting worker %d (pid %d): %s", w.index, w.proc.pid, why)
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)  # drains; _keep_running starts it again

    async def _reload_worker(self, w: Worker, config: str) -> str:
        """"applied", "refused" (the worker said why) or "no answer"."""
        try:
            status, body = await http_request(w.control, "POST", "/reload", config.encode(), timeout_s=30)
        except (OSError, TimeoutError, ValueError, IndexError) as e:
            log.error("worker %d did not answer the reload: %r", w.index, e)
            return "no answer"
        if status != 200:
            log.error("worker %d refused the reload: %s", w.index, body.decode(errors="replace").strip())
            return "refused"
        return "applied"

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if not w.retiring and w.proc is not None and w.proc.returncode is None]

    async def restart_workers(self) -> bool:
        """Zero-downtime replacement of every worker (SIGUSR2)."""
        async with self._busy:
            new_cfg = self._load()
            if new_cfg is None:
                return False
            blockers = [b for b in reload_blockers(self.cfg, new_cfg)
                        if b.startswith(("server.listen", "server.admin_listen", "server.workers"))]
            if blockers:
                log.error("worker replacement refused: changing %s needs a full restart", ", ".join(blockers))
                return False
            candidate = self._candidate(new_cfg)
            old = [w for w in self.workers if not w.retiring]
            t0 = time.monotonic()
            log.info("replacing %s: starting generation %d", plural(len(old), "worker"), self.generation + 1)
            sdnotify.notify("STATUS=replacing workers")
            new = await self._start_generation(candidate)
            if not await self._wait_listening(new, _START_TIMEOUT_S):
                log.error("the new workers did not start; keeping the old ones and the config in force")
                await self._stop_workers(new)
                self._drop_schema_copies(keep=self._committed_copy)
                sdnotify.notify("STATUS=serving (worker replacement failed)")
                return False
            self._commit_candidate(candidate)
            self.cfg = new_cfg
            self._schemas = self._candidate_schemas
            self.version += 1
            for w in new:
                w.version = self.version
            ready_s = time.monotonic() - t0
            await self._stop_workers(old)
            self.last_swap_s = time.monotonic() - t0
            self.restarts_done += 1
            log.info("workers replaced: generation %d listening after %.2fs, the old one drained and exited "
                     "after %.2fs", self.generation, ready_s, self.last_swap_s)
            sdnotify.notify(f"STATUS=serving with {plural(self.n, 'worker')} (generation {self.generation})")
            return True

    # admin endpoints

    async def _start_admin(self) -> None:
        if not self.cfg.server.admin_listen:
            return
        host, port = parse_host_port(self.cfg.server.admin_listen)
        routes: dict[tuple[str, str], Handler] = {("GET", "/metrics"): self._metrics, ("GET", "/healthz"): self._healthz,
                  ("GET", "/readyz"): self._readyz}
        self.admin = AdminServer(routes)
        try:
            await self.admin.start_tcp(host, port)
        except OSError as e:
            raise bind_failed(ADMIN, self.cfg.server.admin_listen, e) from None

    async def _healthz(self, _b: bytes) -> tuple[int, str, bytes]:
        live = len(self._live())
        if live:
            return 200, "text/plain", f"alive: {live} workers\n".encode()
        return 503, "text/plain", b"no worker alive\n"

    async def _readyz(self, _b: bytes) -> tuple[int, str, bytes]:
        if self.stopping:
            return 503, "text/plain", b"not ready: draining\n"
        answers = await asyncio.gather(*(http_request(w.control, "GET", "/readyz", timeout_s=_READY_TIMEOUT_S)
                                         for w in self._live()), return_exceptions=True)
        ready = sum(1 for a in answers if isinstance(a, tuple) and a[0] == 200)
        if ready:
            return 200, "text/plain", f"ready: {ready} of {len(answers)} workers\n".encode()
        why = next((a[1].decode(errors="replace").strip() for a in answers if isinstance(a, tuple)), "no worker")
        return 503, "text/plain", f"not ready: {why}\n".encode()

    async def _metrics(self, _b: bytes) -> tuple[int, str, bytes]:
        async with self._scrape_lock:  # one merge at a time; others reuse it
            now = time.monotonic()
            if now - self._scraped_at > 0.5:
                live = self._live()
                answers = await asyncio.gather(*(http_request(w.control, "GET", "/metrics", timeout_s=_CHECK_TIMEOUT_S)
                                                 for w in live), return_exceptions=True)
                texts = [(w.index, w.generation, a[1].decode()) for w, a in zip(live, answers, strict=True)
                         if isinstance(a, tuple) and a[0] == 200]
                # Parsing is CPU work: off the loop that answers health checks.
                self._scraped = await asyncio.get_running_loop().run_in_executor(None, self._render, texts)
                self._scraped_at = time.monotonic()
        return 200, "text/plain; version=0.0.4; charset=utf-8", self._scraped

    def _render(self, texts: list[tuple[int, int, str]]) -> bytes:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_MergedCollector(self, texts))
        return generate_latest(reg)


class _MergedCollector(Collector):
    """The workers' metric families with a ``worker`` label, plus the supervisor's."""

    def __init__(self, sup: Supervisor, texts: list[tuple[int, int, str]]) -> None:
        self.sup = sup
        self.texts = texts

    def collect(self):
        merged: dict[str, Metric] = {}
        for index, gen, text in self.texts:
            for fam in text_string_to_metric_families(text):
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    labels = {**s.labels, "worker": str(index), "generation": str(gen)}
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from merged.values()
        sup = self.sup
        up = GaugeMetricFamily("eventbroker_workers", "Worker processes running", value=len(sup._live()))
        restarts = CounterMetricFamily("eventbroker_worker_restarts", "Workers started again after dying",
                                       value=sup.worker_restarts)
        reloads = CounterMetricFamily("eventbroker_config_reloads", "Config reloads applied", value=sup.reloads)
        swaps = CounterMetricFamily("eventbroker_worker_replacements", "Zero-downtime worker replacements",
                                    value=sup.restarts_done)
        last = GaugeMetricFamily("eventbroker_last_replacement_seconds",
                                 "How long the last worker replacement took", value=sup.last_swap_s)
        yield from (up, restarts, reloads, swaps, last)


async def run_supervisor(cfg: Config, config_path: str | None, overrides: dict, n_workers: int,
                         log_format: str, verbose: bool) -> int:
    return await Supervisor(cfg, config_path, overrides, n_workers, log_format, verbose).run()
