"""A stalled broker: memory stays bounded and critical types go first."""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec
import psutil
import pytest

from conftest import make_config, read_topic, serve_daemon
from eventbroker.client import Producer
from eventbroker.kafka.embedded import EmbeddedKafka, free_port


@pytest.mark.skipif(bool(os.environ.get("EVENTBROKER_TEST_KAFKA")), reason="needs a broker this test can stop")
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_stalled_broker_bounded_memory_and_critical_first(tmp_path):
    """Producers faster than the broker (here: a broker that stopped). The
    daemon's memory stays within the budget plus a fixed margin, the low type
    is told to retry later, the critical type is not; all arrive once the
    broker is back."""
    budget = 32 * 1024 * 1024
    broker = EmbeddedKafka(log_path=str(tmp_path / "tansu.log")).start()
    cfg = make_config(
        broker.bootstrap, {"pay": {"priority": "critical"}, "debug": {"priority": "low"}},
        server={"memory_budget_bytes": budget},
        kafka={"stall_timeout_ms": 120_000, "request_timeout_ms": 120_000},
    )
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    daemon = serve_daemon(conf, port, log)
    proc = psutil.Process(daemon.pid)
    try:
        addr = f"127.0.0.1:{port}"
        window = {"max_inflight_batches": 64, "batch_max_bytes": 512 * 1024}  # up to 32 MB in flight each
        async with Producer(addr, client_id="pay", **window) as pay, Producer(addr, client_id="debug", **window) as debug:
            await pay.send_and_wait("pay", b"warm-up")
            await debug.send_and_wait("debug", b"warm-up")
            baseline = proc.memory_info().rss
            broker.proc.send_signal(signal.SIGSTOP)
            payload = b"p" * 1000
            low = [await debug.send("debug", payload) for _ in range(40_000)]  # ~45 MB in the gateway
            await asyncio.sleep(1.0)
            crit = [await pay.send("pay", payload) for _ in range(10_000)]  # ~11 MB
            peak = baseline
            for _ in range(30):
                await asyncio.sleep(0.1)
                peak = max(peak, proc.memory_info().rss)
            low_retried, crit_retried = debug.stats["retried"], pay.stats["retried"]
            broker.proc.send_signal(signal.SIGCONT)
            await asyncio.gather(pay.flush(timeout_s=120), debug.flush(timeout_s=120))
            assert all(f.result() for f in low + crit)
        growth = peak - baseline
        print(f"\noverload: budget {budget >> 20} MiB, daemon RSS {baseline >> 20} MiB before, "
              f"{peak >> 20} MiB at peak (+{growth >> 20} MiB); retry-later events: low {low_retried}, "
              f"critical {crit_retried}")
        assert low_retried > 0
        assert crit_retried == 0
        assert growth < budget + 48 * 1024 * 1024
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
    assert len(read_topic(broker.bootstrap, cfg.types["pay"].topic, 10_001)) == 10_001
    broker.stop()
