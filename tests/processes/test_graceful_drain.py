"""SIGTERM under load: the daemon says GOAWAY, finishes what it accepted and
exits; the SDK moves to the next gateway it knows; nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import time

import msgspec
import pytest

from conftest import make_config, read_topic, record_headers, serve_daemon
from eventbroker.client import Producer
from eventbroker.kafka.embedded import free_port


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_sigterm_moves_producers_to_the_other_gateway(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap, {"play": {}})
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    port_a, port_b = free_port(), free_port()
    log_a = open(tmp_path / "a.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    log_b = open(tmp_path / "b.log", "wb")  # noqa: ASYNC230, SIM115
    a = serve_daemon(conf, port_a, log_a)
    b = serve_daemon(conf, port_b, log_b)
    total = 20_000
    try:
        async with Producer([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"], linger_ms=2) as p:
            futs: list[asyncio.Future[bytes]] = []

            async def produce() -> None:
                for i in range(total):
                    futs.append(await p.send("play", b"e%d" % i))
                    if i % 200 == 0:
                        await asyncio.sleep(0.001)

            async def terminate_a() -> float:
                while sum(1 for f in futs if f.done()) < 2000:
                    await asyncio.sleep(0.001)
                a.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                rc = await asyncio.get_running_loop().run_in_executor(None, a.wait, 30)
                assert rc == 0
                return time.monotonic() - t0

            _, drain_s = await asyncio.gather(produce(), terminate_a())
            await p.flush(timeout_s=60)
            ids = [f.result() for f in futs]  # every event persisted
            reconnects = p.reconnects
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        log_a.close()
        log_b.close()
    got = read_topic(kafka_bootstrap, cfg.types["play"].topic, total, timeout_s=60)
    found = {record_headers(m)["eb.id"] for m in got}
    print(f"\nsent {total}, persisted {len(ids)}, found {len(found)}, duplicates {len(got) - len(found)}, "
          f"daemon A drained and exited in {drain_s:.2f}s, producer reconnects {reconnects}")
    assert found == set(ids)
    assert reconnects >= 1
    a_log = (tmp_path / "a.log").read_text()
    assert "signal received: draining" in a_log and "eventbroker stopped" in a_log
