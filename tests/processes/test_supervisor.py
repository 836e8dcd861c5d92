"""``eventbroker serve --workers N`` as SREs run it: real processes, signals,
a real systemd notify socket, the admin endpoints and the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from conftest import daemon_address, make_config, metrics, read_ids, total
from eventbroker.client import Producer
from eventbroker.errors import EventRejected
from eventbroker.kafka.embedded import free_port, wait_for_port
from eventbroker.ops.admin_http import http_request


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    async def wait_for(self, field: str, timeout_s: float = 60, after: int = 0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.drain()[after:]:
                if field in m.split("\n"):
                    return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {field!r} from the daemon; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def supervised(tmp_path: Path, conf: Path, port: int, workers: int = 2,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventbroker.cli", "--log-format", "json", "serve", "--config", str(conf),
         "--listen", f"127.0.0.1:{port}", "--workers", str(workers)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        deadline = time.monotonic() + 60  # every worker listens: the supervisor says it is ready
        while b'"logger":"eventbroker.supervisor","msg":"eventbroker ready' not in \
                (tmp_path / "serve.log").read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, "the supervisor exited"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def asupervised(tmp_path: Path, conf: Path, port: int, workers: int = 2):
    """``supervised`` for tests whose event loop must keep running while the
    daemon starts (a fault proxy in this loop carries its Kafka traffic)."""
    cm = supervised.__wrapped__(tmp_path, conf, port, workers)  # the generator
    proc = await asyncio.to_thread(next, cm)
    try:
        yield proc
    finally:
        await asyncio.to_thread(next, cm, None)


def worker_pids(sup_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(sup_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def write_conf(tmp_path: Path, cfg, admin_port: int) -> Path:
    cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server,
                                                                      admin_listen=f"127.0.0.1:{admin_port}"))
    conf = tmp_path / "eventbroker.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    return conf


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_workers_share_the_port_restart_when_killed_and_report_metrics(tmp_path, kafka_bootstrap):
    """Two workers behind one port: connections spread over both; kill -9 of one
    is logged, counted and repaired while producers keep going; systemd is
    told READY, WATCHDOG and STOPPING."""
    cfg = make_config(kafka_bootstrap, {"play": {}})
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    admin = f"127.0.0.1:{admin_port}"
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with supervised(tmp_path, conf, port, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}) as sup:
            await notify.wait_for("READY=1")
            await notify.wait_for("WATCHDOG=1")
            # 24 connections: the chance that the kernel puts all on one worker is 2**-23 (with 8 it was 1 in 128)
            producers = [Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300)) for _ in range(24)]
            for p in producers:
                await p.start()
                await p.wait_connected(30)
            m = await metrics(admin)
            per_worker = [total(m, "eventbroker_connections", worker=str(i)) for i in range(2)]
            assert sum(per_worker) == len(producers) and all(n >= 1 for n in per_worker), per_worker  # the kernel spread them
            futs = []
            for i in range(4000):
                futs.append(await producers[i % len(producers)].send("play", b"before-%d" % i))
            await asyncio.gather(*futs)
            victim = worker_pids(sup.pid)[0]
            os.kill(victim, signal.SIGKILL)
            t_kill = time.monotonic()
            for i in range(4000):
                futs.append(await producers[i % len(producers)].send("play", b"after-%d" % i))
            for p in producers:
                await p.flush(timeout_s=60)
            ids = {f.result() for f in futs}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = await metrics(admin)
                if total(m, "eventbroker_workers") == 2 and total(m, "eventbroker_worker_restarts_total") == 1:
                    break
                await asyncio.sleep(0.1)
            replaced_after = time.monotonic() - t_kill
            assert total(m, "eventbroker_workers") == 2
            assert total(m, "eventbroker_worker_restarts_total") == 1
            assert len(worker_pids(sup.pid)) == 2 and victim not in worker_pids(sup.pid)
            assert total(m, "eventbroker_events_persisted_total", type="play") >= 4000  # the survivors' counts
            for name in ("eventbroker_kafka_produce_seconds_count", "eventbroker_ack_seconds_count"):
                assert total(m, name, type="play") > 0
            for p in producers:
                await p.close()
            sup.send_signal(signal.SIGTERM)
            assert sup.wait(60) == 0
        await notify.wait_for("STOPPING=1")
    finally:
        notify.close()
    found = read_ids(kafka_bootstrap, cfg.types["play"].topic, ids)
    log = (tmp_path / "serve.log").read_text()
    print(f"\n{len(producers)} producers over 2 workers ({per_worker} connections); worker {victim} killed -9, running again "
          f"after {replaced_after:.1f}s; 8000 acked, {len(found)} in Kafka; notify: {notify.messages[:3]}")
    assert found == ids
    assert f"(pid {victim}) exited with -9" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sighup_reloads_without_dropping_a_connection_and_refuses_a_bad_config(tmp_path, kafka_bootstrap):
    """A new type and a changed priority apply on SIGHUP while the producer
    stays connected; an invalid config is refused with a log line, and the
    old one stays in force (also for a worker restarted meanwhile)."""
    prefix = "r" + os.urandom(4).hex()
    cfg = make_config(kafka_bootstrap, {"play": {}}, prefix=prefix)
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with supervised(tmp_path, conf, port, env={"NOTIFY_SOCKET": notify.path}) as sup:
            await notify.wait_for("READY=1")
            async with Producer(f"127.0.0.1:{port}", linger_ms=1) as p:
                await (await p.send("play", b"x"))
                with pytest.raises(Exception, match="unknown_type"):
                    await (await p.send("search", b"not yet"))
                new = make_config(kafka_bootstrap, {"play": {"priority": "critical"}, "search": {}}, prefix=prefix)
                write_conf(tmp_path, new, admin_port)
                n = len(notify.drain())
                sup.send_signal(signal.SIGHUP)
                reloading = await notify.wait_for("RELOADING=1", after=n)
                assert any(f.startswith("MONOTONIC_USEC=") for f in reloading.split("\n"))
                await notify.wait_for("READY=1", after=n)
                eid = await (await p.send("search", b"now known"))  # same connection, new type
                assert eid
                # A broken file: refused, the old config stays.
                conf.write_text(conf.read_text() + '\n[types.bad]\npriority = "urgent"\n')
                n = len(notify.drain())
                sup.send_signal(signal.SIGHUP)
                await notify.wait_for("READY=1", after=n)
                await (await p.send("search", b"still fine"))
                # A worker that dies now starts with the config in force.
                os.kill(worker_pids(sup.pid)[0], signal.SIGKILL)
                for i in range(200):
                    await (await p.send("search", b"after restart %d" % i))
                assert p.reconnects <= 1  # only the connection of the killed worker, if it was ours
                m = await metrics(f"127.0.0.1:{admin_port}")
                assert total(m, "eventbroker_config_reloads_total") == 1
    finally:
        notify.close()
    log = (tmp_path / "serve.log").read_text()
    assert f"config reloaded from {conf}" in log and "added type search" in log and "priority normal -> critical" in log
    assert "config.next.toml" not in log  # workers name the user's file, not their supervisor's copy
    assert "config reload refused, the running config stays in force" in log and "urgent" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_zero_downtime_worker_replacement_under_load(tmp_path, kafka_bootstrap):
    """SIGUSR2 under load: new workers bind the port before the old ones drain;
    no connection attempt fails, no event is lost."""
    cfg = make_config(kafka_bootstrap, {"play": {}})
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    total_events = 40_000
    with supervised(tmp_path, conf, port) as sup:
        old = set(worker_pids(sup.pid))
        producers = [Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300)) for _ in range(4)]
        for p in producers:
            await p.start()
        futs: list[asyncio.Future[bytes]] = []

        async def produce() -> None:
            for i in range(total_events):
                futs.append(await producers[i % 4].send("play", b"e-%d" % i))
                if i % 200 == 0:
                    await asyncio.sleep(0.002)

        async def replace() -> float:
            while len(futs) < total_events // 4:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            sup.send_signal(signal.SIGUSR2)
            while set(worker_pids(sup.pid)) & old:
                await asyncio.sleep(0.02)
            return time.monotonic() - t0

        _, swap_s = await asyncio.gather(produce(), replace())
        for p in producers:
            await p.flush(timeout_s=60)
        ids = {f.result() for f in futs}
        failures = sum(p.stats["connect_failures"] for p in producers)
        reconnects = sum(p.reconnects for p in producers)
        sent_during = len(futs)
        for p in producers:
            await p.close()
        m = await metrics(f"127.0.0.1:{admin_port}")
        new = set(worker_pids(sup.pid))
    found = read_ids(kafka_bootstrap, cfg.types["play"].topic, ids)
    log = (tmp_path / "serve.log").read_text()
    print(f"\nworkers replaced under load in {swap_s:.2f}s (supervisor: {total(m, 'eventbroker_last_replacement_seconds'):.2f}s); "
          f"{sent_during} sent, {len(ids)} acked, {len(found)} in Kafka, {reconnects} reconnects, "
          f"{failures} failed connection attempts")
    assert len(new) == 2 and not (new & old)
    assert found == ids and len(ids) == total_events
    assert failures == 0
    assert reconnects >= 1  # producers moved to the new workers
    assert "workers replaced" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_admin_endpoints_of_a_single_process(daemon_factory):
    """/metrics counts what happened, /healthz answers, /readyz turns 503 while draining."""
    from conftest import daemon_address

    async with daemon_factory({"play": {}}) as d:
        admin = d.admin.address
        async with Producer(daemon_address(d)) as p:
            for i in range(100):
                await p.send("play", b"m-%d" % i)
            await p.flush()
            with pytest.raises(Exception, match="unknown_type"):
                await (await p.send("nope", b"x"))
        m = await metrics(admin)
        assert total(m, "eventbroker_events_received_total", type="play") == 100
        assert total(m, "eventbroker_events_persisted_total", type="play") == 100
        assert total(m, "eventbroker_events_rejected_total", type="<unknown>", reason="unknown_type") == 1
        assert total(m, "eventbroker_ack_seconds_count", type="play") >= 1
        assert total(m, "eventbroker_connections_opened_total") == 1
        assert (await http_request(admin, "GET", "/healthz"))[0] == 200
        assert (await http_request(admin, "GET", "/readyz")) == (200, b"ready\n")
        assert (await http_request(admin, "GET", "/nope"))[0] == 404
        assert (await http_request(admin, "POST", "/metrics"))[0] == 405
        d.server.draining = True
        assert (await http_request(admin, "GET", "/readyz")) == (503, b"not ready: draining\n")
        d.server.draining = False


def test_json_logs(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap, {"play": {}})
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "eventbroker.cli", "--log-format", "json", "serve",
                                 "--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    import orjson

    lines = [orjson.loads(x) for x in (tmp_path / "serve.log").read_bytes().splitlines() if x.strip()]
    assert lines and all({"ts", "level", "logger", "msg", "pid"} <= set(x) for x in lines)
    assert any(x["msg"].startswith("eventbroker ready") for x in lines)


def test_systemd_unit_file(tmp_path):
    """config/eventbroker.service has what the operations guide promises, and
    systemd-analyze accepts it (when installed) with ExecStart pointing at
    this installation."""
    import re
    import shutil

    from conftest import REPO

    text = (REPO / "config" / "eventbroker.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=", "LimitNOFILE=",
                 "DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=eventbroker", "NoNewPrivileges=yes",
                 "KillMode=mixed", "RuntimeDirectory=eventbroker"):
        assert line in text, line
    exe = Path(sys.executable).parent / "eventbroker"
    unit = tmp_path / "eventbroker.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M))
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [x for x in (r.stdout + r.stderr).splitlines() if "eventbroker.service" in x]
    assert not problems, problems


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_hung_worker_is_killed_and_replaced(tmp_path, kafka_bootstrap):
    """SIGSTOP of a worker: its health checks fail, the supervisor kills it
    and starts another; /readyz answers within a second meanwhile."""
    cfg = make_config(kafka_bootstrap, {"play": {}})
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    admin = f"127.0.0.1:{admin_port}"
    with supervised(tmp_path, conf, port) as sup:
        victim = worker_pids(sup.pid)[0]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        slowest = 0.0
        while victim in worker_pids(sup.pid) and time.monotonic() - t0 < 30:
            t1 = time.monotonic()
            status, _ = await http_request(admin, "GET", "/readyz")
            slowest = max(slowest, time.monotonic() - t1)
            assert status == 200  # the other worker is ready
            await asyncio.sleep(0.2)
        replaced_s = time.monotonic() - t0
        assert victim not in worker_pids(sup.pid)
        deadline = time.monotonic() + 30
        while len(worker_pids(sup.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(worker_pids(sup.pid)) == 2
        assert slowest < 1.0
    log = (tmp_path / "serve.log").read_text()
    print(f"\nhung worker killed after {replaced_s:.1f}s; slowest /readyz meanwhile {slowest * 1000:.0f} ms")
    assert "failed 3 health checks in a row" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_spool_left_by_a_replaced_generation_is_delivered(tmp_path, proxied_broker):
    """Kafka unreachable while a spooled type is acknowledged; SIGUSR2 replaces
    the worker (its drain deadline passes with the backlog still on disk, in
    its slot); once Kafka is back the new worker delivers the old slot too."""
    proxy, broker = proxied_broker
    cfg = make_config(f"127.0.0.1:{proxy.port}", {"audit": {"ack": "spool"}},
                      spool={"dir": str(tmp_path / "spool")}, server={"drain_timeout_ms": 500},
                      kafka={"request_timeout_ms": 2000, "retry_backoff_max_ms": 500})
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    async with asupervised(tmp_path, conf, port, workers=1) as sup:
        async with Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300)) as p:
            proxy.cut()
            futs = [await p.send("audit", b"kept-%d" % i) for i in range(5000)]
            await p.flush(timeout_s=30)
            ids = {f.result() for f in futs}  # acknowledged from the spool while Kafka is away
            old = set(worker_pids(sup.pid))
            sup.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while set(worker_pids(sup.pid)) & old and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not set(worker_pids(sup.pid)) & old
            from eventbroker.spool.log import check_directory

            left = check_directory(tmp_path / "spool" / "slot-0" / "audit")["pending_events"]
            proxy.heal()
            found = await asyncio.to_thread(read_ids, broker.bootstrap, cfg.types["audit"].topic, ids, 60)
    log = (tmp_path / "serve.log").read_text()
    print(f"\n5000 acknowledged with Kafka cut off; {left} left in the replaced worker's slot; "
          f"{len(found)} in Kafka after healing")
    assert left > 0, "the old generation had delivered everything: the adoption was not tested"
    assert found == ids
    assert "delivering" in log and "unowned spool" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_reload_one_worker_refuses_is_rolled_back(tmp_path, kafka_bootstrap):
    """Worker 1 cannot apply the new config (its spool directory for the new
    type is held by another process): no worker keeps it, and a worker
    restarted afterwards starts with the config in force."""
    from eventbroker.spool import log as sp

    spool_dir = tmp_path / "spool"
    cfg = make_config(kafka_bootstrap, {"play": {}}, spool={"dir": str(spool_dir)})
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)
    with supervised(tmp_path, conf, port) as sup:
        # Workers take slots lazily; hold slot-1's type directory so the second
        # worker to need a slot fails to open it.
        blocker = sp.SpoolLog(spool_dir / "slot-1" / "beta", segment_bytes=1 << 20, fsync="never")
        blocker.open()
        try:
            new = make_config(kafka_bootstrap, {"play": {}, "beta": {"ack": "spool"}},
                              spool={"dir": str(spool_dir)}, prefix=cfg.types["play"].topic.split(".")[0])
            write_conf(tmp_path, new, admin_port)
            sup.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "refused by" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            async with Producer(f"127.0.0.1:{port}") as p:
                for _ in range(6):  # whichever worker answers, beta is unknown everywhere
                    with pytest.raises(EventRejected, match="unknown_type"):
                        await (await p.send("beta", b"x"))
            m = await metrics(f"127.0.0.1:{admin_port}")
            assert total(m, "eventbroker_config_reloads_total") == 0
        finally:
            blocker.close()
    log = (tmp_path / "serve.log").read_text()
    assert "refused by 1 of 2 workers; the running config stays in force" in log


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_status_prints_live_per_type_rates(daemon_factory):
    """`eventbroker status --once` against a daemon receiving events: a row per
    type with a non-zero rate for the busy one."""
    import sys

    async with daemon_factory({"play": {}, "search": {}}) as d:
        async with Producer(daemon_address(d), linger_ms=1) as p:
            stop = asyncio.Event()

            async def send() -> None:
                i = 0
                while not stop.is_set():
                    await p.send("play", b"s-%d" % i)
                    i += 1
                    if i % 50 == 0:
                        await asyncio.sleep(0.001)

            sender = asyncio.create_task(send())
            r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "eventbroker.cli", "status", "--admin",
                                                        d.admin.address, "--once", "--interval", "0.5"],
                                        capture_output=True, text=True, timeout=60)
            stop.set()
            await sender
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"play", "search"}
    assert rows["play"][1] == "delivering" and rows["play"][2] != "0"  # recv/s
    assert rows["search"][2] == "0"
    r2 = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "eventbroker.cli", "status", "--admin",
                                                  "127.0.0.1:1", "--once"], capture_output=True, text=True, timeout=60)
    assert r2.returncode == 1 and "cannot read http://127.0.0.1:1/metrics" in r2.stderr


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sighup_applies_a_compatible_schema_version_and_refuses_a_breaking_one(tmp_path, kafka_bootstrap):
    """Schemas beside the config: v2 (a new optional field) applies on SIGHUP
    without dropping the producer's connection; v3 (a new required field)
    is refused with the field and the rule, v2 stays in force, also for a
    worker restarted while the broken file is still on disk."""
    import json

    from eventbroker.config import SchemasConfig

    v1 = {"type": "object", "properties": {"user": {"type": "string"}, "track": {"type": "integer"}},
          "required": ["user", "track"], "additionalProperties": False}
    v2 = {**v1, "properties": {**v1["properties"], "ms_played": {"type": "integer"}}}
    v3 = {**v2, "required": ["user", "track", "country"],
          "properties": {**v2["properties"], "country": {"type": "string"}}}
    folder = tmp_path / "schemas" / "play"
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps(v1))
    cfg = make_config(kafka_bootstrap, {"play": {"schema": "play"}}, schemas=SchemasConfig(dir="schemas"))
    admin_port, port = free_port(), free_port()
    conf = write_conf(tmp_path, cfg, admin_port)  # "schemas" is taken from the config file's folder
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with supervised(tmp_path, conf, port, env={"NOTIFY_SOCKET": notify.path}) as sup:
            await notify.wait_for("READY=1")
            async with Producer(f"127.0.0.1:{port}", linger_ms=1) as p:
                await (await p.send("play", b'{"user":"ada","track":1}'))
                with pytest.raises(EventRejected, match="schema_violation") as info:
                    await (await p.send("play", b'{"user":"ada","track":1,"ms_played":5}'))
                assert "ms_played" in info.value.detail
                (folder / "2.json").write_text(json.dumps(v2))
                n = len(notify.drain())
                sup.send_signal(signal.SIGHUP)
                await notify.wait_for("READY=1", after=n)
                await (await p.send("play", b'{"user":"ada","track":1,"ms_played":5}'))  # v2, same connection
                (folder / "3.json").write_text(json.dumps(v3))
                n = len(notify.drain())
                sup.send_signal(signal.SIGHUP)
                await notify.wait_for("READY=1", after=n)
                await (await p.send("play", b'{"user":"ada","track":2,"ms_played":6}'))  # v2 still the latest
                with pytest.raises(EventRejected, match="unknown_schema_version"):
                    await (await p.send("play", b'{"user":"ada","track":2,"country":"SE"}', schema_version=3))
                # A worker restarted now, with 3.json still on disk, starts with what is in force.
                os.kill(worker_pids(sup.pid)[0], signal.SIGKILL)
                for i in range(100):
                    await (await p.send("play", b'{"user":"ada","track":%d,"ms_played":1}' % i))
                assert p.reconnects <= 1  # only the connection of the killed worker, if it was ours
                m = await metrics(f"127.0.0.1:{admin_port}")
                assert total(m, "eventbroker_config_reloads_total") == 1
                assert total(m, "eventbroker_schema_events_validated_total", type="play", version="2") >= 100
    finally:
        notify.close()
    log = (tmp_path / "serve.log").read_text()
    assert "type play: schema v2 added" in log
    assert "play v3 adds required field `country`: not backward compatible with v2" in log
    assert "exited with -9" in log and log.count("schema") >= 2
