"""Kill -9 the daemon mid-stream: nothing acknowledged is lost, and the SDK
resends whatever was not acknowledged once the daemon is back (through
``send()`` with a future per event, and through ``produce()`` with none)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import msgspec
import pytest

from conftest import make_config, read_topic, record_headers, serve_daemon
from eventbroker.client import Producer
from eventbroker.kafka.embedded import free_port

TOTAL = 30_000


class _Daemon:
    """``eventbroker serve`` on a fixed port, which can be killed -9 and started again there."""

    def __init__(self, tmp_path, kafka_bootstrap: str) -> None:
        self.cfg = make_config(kafka_bootstrap, {"play": {}})
        self.conf = tmp_path / "eb.toml"
        self.conf.write_bytes(msgspec.toml.encode(self.cfg))
        self.port = free_port()
        self.log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed by the context below
        self.procs = [serve_daemon(self.conf, self.port, self.log)]

    def producer(self) -> Producer:
        return Producer(f"127.0.0.1:{self.port}", linger_ms=2, reconnect_backoff_ms=(20, 300))

    async def kill_and_restart(self) -> None:
        os.kill(self.procs[-1].pid, signal.SIGKILL)
        self.procs[-1].wait()
        self.procs.append(await asyncio.get_running_loop().run_in_executor(
            None, serve_daemon, self.conf, self.port, self.log))

    def stop(self) -> None:
        """SIGTERM to the restarted daemon: it drains and exits 0."""
        assert len(self.procs) == 2, "the daemon was never restarted"
        self.procs[-1].send_signal(signal.SIGTERM)
        assert self.procs[-1].wait(30) == 0

    def records(self) -> list:
        return read_topic(self.cfg.kafka.bootstrap_servers, self.cfg.types["play"].topic, TOTAL, timeout_s=60)


@contextlib.asynccontextmanager
async def _daemon(tmp_path, kafka_bootstrap: str) -> AsyncIterator[_Daemon]:
    d = _Daemon(tmp_path, kafka_bootstrap)
    try:
        yield d
    finally:
        for proc in d.procs:
            if proc.poll() is None:
                proc.kill()
        d.log.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sigkill_daemon_mid_stream_loses_no_acked_event(tmp_path, kafka_bootstrap):
    acked_before_kill: set[bytes] = set()
    async with _daemon(tmp_path, kafka_bootstrap) as d:
        async with d.producer() as p:
            futs: list[asyncio.Future[bytes]] = []

            async def produce() -> None:
                for i in range(TOTAL):
                    futs.append(await p.send("play", b"event-%d" % i))
                    if i % 200 == 0:
                        await asyncio.sleep(0.001)  # a steady stream, not one burst

            async def kill_and_restart() -> None:
                nonlocal acked_before_kill
                # Kill without warning once a few thousand events were acknowledged,
                # while the stream goes on (so more are in flight).
                while True:  # some acknowledged, and some surely still in flight
                    done = sum(1 for f in futs if f.done())
                    if done >= 3000 and len(futs) - done >= 500:
                        break
                    await asyncio.sleep(0.001)
                acked_before_kill = {f.result() for f in futs if f.done() and not f.exception()}
                await d.kill_and_restart()

            await asyncio.gather(produce(), kill_and_restart())
            await p.flush(timeout_s=120)
            ids = [f.result() for f in futs]  # raises if any event was not persisted
            resent = p.stats["resent_after_reconnect"]
            reconnects = p.reconnects
        d.stop()
        got = d.records()
    found = {record_headers(m)["eb.id"] for m in got}
    duplicates = len(got) - len(found)
    print(f"\nsent {TOTAL}, acked before kill {len(acked_before_kill)}, acked in the end {len(ids)}, "
          f"found in Kafka {len(found)}, duplicates {duplicates}, resent after reconnect {resent}")
    assert acked_before_kill, "the kill came before any ack: the test proved nothing"
    assert reconnects >= 1
    assert acked_before_kill <= found  # nothing acknowledged was lost
    assert found == set(ids)  # and everything was delivered in the end


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sigkill_mid_stream_with_produce_resends_from_the_sent_frames(tmp_path, kafka_bootstrap):
    """The same kill through ``produce()``: no future or object per event, so
    the resends after the reconnect are copied out of the frames in flight;
    every generated id is in Kafka in the end, and the counts agree."""
    async with _daemon(tmp_path, kafka_bootstrap) as d:
        async with d.producer() as p:
            prefix = p.id_prefix

            async def stream() -> None:
                for i in range(TOTAL):
                    p.produce("play", b"event-%d" % i, key=b"k%d" % (i % 10) if i % 2 else None)
                    if i % 200 == 0:
                        await asyncio.sleep(0.001)

            async def kill_and_restart() -> tuple[int, int]:
                while not (p.stats["persisted"] >= 3000 and p.stats["buffered"] >= 500):
                    await asyncio.sleep(0.001)
                acked = p.stats["persisted"]
                await d.kill_and_restart()
                return acked, p.stats["buffered"]

            _, (acked_before_kill, buffered_at_kill) = await asyncio.gather(stream(), kill_and_restart())
            report = await p.flush(timeout_s=120)
            stats = p.stats
        d.stop()
        got = d.records()
    found = {record_headers(m)["eb.id"] for m in got}
    print(f"\nproduced {TOTAL}, acked before kill {acked_before_kill} ({buffered_at_kill} buffered), "
          f"found {len(found)}, duplicates {len(got) - len(found)}, resent {stats['resent_after_reconnect']}")
    assert found == {prefix + i.to_bytes(8, "big") for i in range(1, TOTAL + 1)}
    assert report.persisted == stats["persisted"] == TOTAL and report.rejected == report.failed == 0
    assert stats["resent_after_reconnect"] > 0 and stats["buffered"] == 0
    assert {m.value() for m in got} == {b"event-%d" % i for i in range(TOTAL)}
