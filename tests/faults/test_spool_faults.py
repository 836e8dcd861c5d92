"""The spool through faults: Kafka cut off, kill -9 of the daemon, a full disk, reloads."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    MiB,
    daemon_address,
    make_config,
    read_ids,
    read_topic,
    record_headers,
    serve_daemon,
    write_config,
)
from eventbroker.client import Producer
from eventbroker.kafka.embedded import free_port
from eventbroker.ops.daemon import Daemon
from eventbroker.spool import log as sp


def _spool_types() -> dict[str, dict]:
    return {"audit": {"ack": "spool", "priority": "high"}, "play": {"priority": "critical"}}


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_spooled_type_is_acked_while_kafka_is_cut_off_and_delivered_after(tmp_path, proxied_broker):
    """Kafka unreachable (the daemon's connections cut by a proxy): the spooled
    type keeps being acknowledged, the Kafka-acked type is handed back; once
    the network heals, the spool goes out in full, in order per key."""
    proxy, broker = proxied_broker
    cfg = make_config(f"127.0.0.1:{proxy.port}", _spool_types(), spool={"dir": str(tmp_path / "spool")},
                      kafka={"stall_timeout_ms": 800, "retry_backoff_ms": 50, "retry_backoff_max_ms": 500,
                             "request_timeout_ms": 3000})
    d = Daemon(cfg)
    await d.start()
    try:
        lane = d.router.lanes["audit"]
        async with Producer(daemon_address(d), linger_ms=2) as p:
            proxy.cut()
            t0 = time.monotonic()
            futs = [await p.send("audit", b"a-%d" % i, key=b"k%d" % (i % 5)) for i in range(20_000)]
            await p.flush(timeout_s=30)
            ids = [f.result() for f in futs]  # every one persisted while Kafka is unreachable
            acked_s = time.monotonic() - t0
            play = await p.send("play", b"p")
            await asyncio.sleep(1.5)
            assert not play.done()  # the Kafka-acked type waits (handed back, resent)
            assert lane.forwarder.backlog_bytes > 0 and lane.forwarder.stats.events_forwarded == 0
            proxy.heal()
            await _until(lambda: lane.forwarder.backlog_bytes == 0, 60, "the spool to drain")
            await asyncio.wait_for(play, 30)
        stats = (lane.spool.stats.events_written, lane.forwarder.stats.events_forwarded,
                 lane.forwarder.stats.send_failures)
        await d.stop()
        # Read while the proxy runs: the broker advertises the proxy's address.
        got = await asyncio.get_running_loop().run_in_executor(
            None, read_topic, broker.bootstrap, cfg.types["audit"].topic, len(ids), 60.0)
    finally:
        await d.stop()
    found = [record_headers(m)["eb.id"] for m in got]
    print(f"\nspooled 20000 with Kafka cut off in {acked_s:.2f}s; written {stats[0]}, forwarded {stats[1]} "
          f"after healing ({stats[2]} failed sends retried), found {len(set(found))}, "
          f"duplicates {len(found) - len(set(found))}")
    assert set(found) == set(ids)
    # Per key (= per partition), the order of sending is kept.
    order = {eid: i for i, eid in enumerate(ids)}
    by_part: dict[int, list[int]] = {}
    for m in got:
        by_part.setdefault(m.partition(), []).append(order[record_headers(m)["eb.id"]])
    for seq in by_part.values():
        assert seq == sorted(seq)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_kill_9_daemon_with_spool_replays_on_restart(tmp_path, kafka_bootstrap):
    """kill -9 of the daemon while its spool holds undelivered events (Kafka
    cut off): the restarted daemon delivers them before anything new, nothing
    acknowledged is lost, and the SDK finishes with everything acknowledged."""
    # The forwarder is held to one small request at a time, so the spool
    # falls behind the producer and holds a backlog when the kill comes.
    cfg = make_config(kafka_bootstrap, {"audit": {"ack": "spool"}}, spool={"dir": str(tmp_path / "spool")},
                      kafka={"max_inflight_batches_per_type": 1, "batch_max_bytes": 4096})
    conf = write_config(tmp_path, cfg)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    first = serve_daemon(conf, port, log)
    second = None
    total = 30_000
    try:
        async with Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300)) as p:
            futs: list[asyncio.Future[bytes]] = []

            async def produce() -> None:
                for i in range(total):
                    futs.append(await p.send("audit", b"event-%d" % i))
                    if i % 500 == 0:
                        await asyncio.sleep(0.001)

            acked_before: set[bytes] = set()

            async def kill_and_restart() -> None:
                nonlocal second, acked_before
                while sum(1 for f in futs if f.done()) < 10_000:
                    await asyncio.sleep(0.001)
                acked_before = {f.result() for f in futs if f.done() and not f.exception()}
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
                report = sp.check_directory(tmp_path / "spool" / "audit")
                nonlocal_pending[0] = report["pending_events"]
                second = await asyncio.get_running_loop().run_in_executor(None, serve_daemon, conf, port, log)

            nonlocal_pending = [0]
            await asyncio.gather(produce(), kill_and_restart())
            await p.flush(timeout_s=120)
            ids = [f.result() for f in futs]
        assert second is not None
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        log.close()
    got = read_topic(kafka_bootstrap, cfg.types["audit"].topic, total, timeout_s=60)
    found = {record_headers(m)["eb.id"] for m in got}
    text = (tmp_path / "serve.log").read_text()
    print(f"\nsent {total}, acked before kill {len(acked_before)}, undelivered in the spool at the kill "
          f"{nonlocal_pending[0]} events, acked in the end {len(ids)}, found {len(found)}, "
          f"duplicates {len(got) - len(found)}")
    assert nonlocal_pending[0] > 0, "the spool was empty at the kill: the replay was not tested"
    assert "delivering them before new events" in text
    assert acked_before <= found
    assert found == set(ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_disk_full_answers_retry_later_and_never_half_acks(tmp_path, kafka_bootstrap):
    """The daemon may not grow a file past 256 KiB (RLIMIT_FSIZE, so the spool
    write fails like a full disk): the spooled type gets retry-later
    (spool_unavailable), the daemon stays up, the other type keeps being
    persisted, no half record is left, and after a restart without the limit
    every event is delivered."""
    cfg = make_config(kafka_bootstrap, _spool_types(), spool={"dir": str(tmp_path / "spool"), "segment_bytes": MiB},
                      kafka={"retry_backoff_ms": 100, "retry_backoff_max_ms": 300, "batch_max_bytes": 16384})
    conf = write_config(tmp_path, cfg)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: ASYNC230, SIM115 - closed below

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [sys.executable, "-m", "eventbroker.cli", "serve", "--single-process", "--config", str(conf),
         "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_file_size)
    from eventbroker.kafka.embedded import wait_for_port

    wait_for_port("127.0.0.1", port, 60, proc)
    second = None
    try:
        # Small batches, so some parts fit whole before the file is full.
        async with Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300),
                            batch_max_bytes=8192) as p:
            audit = [await p.send("audit", os.urandom(100)) for _ in range(5000)]  # ~1.3 MB: does not fit
            play = [await p.send("play", b"p-%d" % i) for i in range(2000)]
            await asyncio.wait_for(asyncio.gather(*play), 30)  # the other type is not held up
            await asyncio.sleep(2)
            assert proc.poll() is None, "the daemon died on a full disk"
            acked = {f.result() for f in audit if f.done() and not f.exception()}
            waiting = sum(1 for f in audit if not f.done())
            retried = p.stats["retried"]
            assert 0 < len(acked) < len(audit) and waiting
            assert retried > 0  # the SDK got retry-later and keeps resending
            report = sp.check_directory(tmp_path / "spool" / "audit")
            assert not report["problems"], report["problems"]  # no half record on disk
            # Restart without the limit: the SDK reconnects and resends.
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            second = serve_daemon(conf, port, log)
            await p.flush(timeout_s=60)
            ids = [f.result() for f in audit]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        for pr in (proc, second):
            if pr is not None and pr.poll() is None:
                pr.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "cannot write the spool" in text and "File too large" in text
    found = read_ids(kafka_bootstrap, cfg.types["audit"].topic, set(ids))
    print(f"\ndisk full: {len(acked)} of {len(audit)} acked before the disk filled, {waiting} waiting, "
          f"{retried} retry-later answers resent; after the restart {len(found)} of {len(ids)} in Kafka")
    assert acked <= found and found == set(ids)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eventbroker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_spool_check_and_replay_commands(tmp_path, proxied_broker):
    """A daemon stops while Kafka is unreachable and its spool holds events;
    ``spool check`` reports them (and a torn tail, which ``--repair`` cuts),
    and ``spool replay`` delivers them without the daemon."""
    proxy, broker = proxied_broker
    spool_dir = tmp_path / "spool"
    cfg = make_config(f"127.0.0.1:{proxy.port}", {"audit": {"ack": "spool"}}, spool={"dir": str(spool_dir)},
                      server={"drain_timeout_ms": 300}, kafka={"request_timeout_ms": 2000})
    d = Daemon(cfg)
    await d.start()
    try:
        async with Producer(daemon_address(d)) as p:
            proxy.cut()
            futs = [await p.send("audit", b"offline-%d" % i) for i in range(3000)]
            await p.flush(timeout_s=30)
            ids = {f.result() for f in futs}
    finally:
        await d.stop()
    proxy.heal()
    conf = write_config(tmp_path, cfg)
    r = await asyncio.to_thread(_cli, "spool", "check", "--config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit: " in r.stdout and "3000 undelivered events" in r.stdout
    seg = max((spool_dir / "audit").glob("*.seg"))
    with open(seg, "ab") as f:  # noqa: ASYNC230 - a few bytes
        f.write(b"\x00\x00\x00\x40torn")
    r = await asyncio.to_thread(_cli, "spool", "check", "--dir", str(spool_dir))
    assert r.returncode == 1 and "problem:" in r.stdout and "short record body" in r.stdout
    r = await asyncio.to_thread(_cli, "spool", "check", "--dir", str(spool_dir), "--repair")
    assert r.returncode == 0 and "repaired:" in r.stdout, r.stdout
    r = await asyncio.to_thread(_cli, "spool", "replay", "--config", str(conf), "--kafka", broker.bootstrap)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delivered 3000 events, 0 bytes left" in r.stdout
    r = await asyncio.to_thread(_cli, "spool", "check", "--config", str(conf))
    assert "0 undelivered events" in r.stdout
    found = await asyncio.to_thread(read_ids, broker.bootstrap, cfg.types["audit"].topic, ids)
    assert found == ids


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_spooled_type_removed_and_added_back_keeps_its_spool(tmp_path, proxied_broker):
    """Kafka cut off; the spooled type is removed by a reload while its spool
    holds acknowledged events (it keeps them), then added back by another
    reload before they were delivered: the same lane returns, takes events
    again, and everything reaches Kafka once the network heals."""
    proxy, broker = proxied_broker
    prefix = "a" + os.urandom(4).hex()
    with_audit = make_config(f"127.0.0.1:{proxy.port}", {"play": {}, "audit": {"ack": "spool"}}, prefix=prefix,
                             spool={"dir": str(tmp_path / "spool")}, kafka={"request_timeout_ms": 2000})
    without = make_config(f"127.0.0.1:{proxy.port}", {"play": {}}, prefix=prefix,
                          spool={"dir": str(tmp_path / "spool")}, kafka={"request_timeout_ms": 2000})
    conf = write_config(tmp_path, with_audit)
    d = Daemon(with_audit, config_path=str(conf))
    await d.start()
    try:
        async with Producer(daemon_address(d), linger_ms=1) as p:
            proxy.cut()
            ids = {await f for f in [await p.send("audit", b"before-%d" % i) for i in range(1000)]}
            lane = d.router.lanes["audit"]
            write_config(tmp_path, without)
            ok, msg = await d.reload()
            assert ok and "removed type audit" in msg
            with pytest.raises(Exception, match="unknown_type"):
                await (await p.send("audit", b"while removed"))
            assert lane.forwarder.backlog_bytes > 0  # still holds what it acknowledged
            write_config(tmp_path, with_audit)
            ok, msg = await d.reload()
            assert ok and "back before its spool was delivered" in msg, msg
            assert d.router.lanes["audit"] is lane
            ids |= {await f for f in [await p.send("audit", b"after-%d" % i) for i in range(1000)]}
            proxy.heal()
            await _until(lambda: lane.forwarder.backlog_bytes == 0, 60, "the spool to drain")
        await d.stop()
        found = await asyncio.to_thread(read_ids, broker.bootstrap, with_audit.types["audit"].topic, ids, 60)
    finally:
        await d.stop()
    assert found == ids and len(ids) == 2000
