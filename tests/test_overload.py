"""Overload: memory stays bounded by the shared budget, and priorities decide
who waits. Unit tests of the admission rule, then the real daemon against a
broker that has stopped answering."""

from __future__ import annotations

import asyncio
import os
import signal
import struct

import msgspec
import psutil
import pytest

from conftest import make_config, read_topic, serve_daemon
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.config import PRIORITY_BUDGET_SHARE
from eventbroker.embedded import EmbeddedKafka, free_port

SHARE = PRIORITY_BUDGET_SHARE


def _router(budget: int):
    router = fp.Router(max_events_per_batch=100_000, max_event_bytes=1 << 20)
    b = fp.MemoryBudget(budget)
    rings = {}
    for prio, share in SHARE.items():
        ring = fp.TypeRing(prio, capacity_bytes=1 << 30, max_event_bytes=1 << 20)
        ring.attach_budget(b, int(budget * share))
        router.add(ring)
        rings[prio] = ring
    return router, rings, b


def _offer(router, name: str, n: int, size: int = 1000, seq: int = 1) -> int:
    enc = fp.BatchEncoder()
    for i in range(n):
        enc.add(name.encode(), struct.pack(">QQ", seq, i + 1), 1, None, b"x" * size)
    r = fp.FrameReader(1 << 24)
    r.feed(enc.finish(seq))
    r.next_frame()
    (_, status, reason, *_rest), = router.ingest(r, 1)[2]
    return status if status != fp.STATUS_RETRY_LATER else (status, reason)


def test_priorities_are_refused_in_order_as_the_budget_fills():
    budget = 1_000_000
    router, rings, b = _router(budget)
    # Fill to ~55% with critical events: low is now refused, the others are not.
    while b.used_bytes < 0.55 * budget:
        assert _offer(router, "critical", 10) == fp.STATUS_ACCEPTED
    assert _offer(router, "low", 10) == (fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED)
    assert _offer(router, "normal", 10) == fp.STATUS_ACCEPTED
    while b.used_bytes < 0.75 * budget:
        _offer(router, "critical", 10)
    assert _offer(router, "normal", 10) == (fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED)
    assert _offer(router, "high", 10) == fp.STATUS_ACCEPTED
    while b.used_bytes < 0.9 * budget:
        _offer(router, "critical", 10)
    assert _offer(router, "high", 10) == (fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED)
    while _offer(router, "critical", 10) == fp.STATUS_ACCEPTED:
        pass
    assert b.used_bytes <= budget  # the hard limit holds
    assert b.used_bytes == sum(r.used_bytes for r in rings.values())
    # Draining frees budget for everyone again.
    for ring in rings.values():
        while (u := ring.skip_unit(1 << 30)) is not None:
            ring.release(u[1], u[2], u[3])
    assert b.used_bytes == 0
    assert _offer(router, "low", 10) == fp.STATUS_ACCEPTED


def test_empty_critical_ring_progresses_at_the_hard_limit():
    budget = 200_000
    router, rings, b = _router(budget)
    while _offer(router, "high", 5) == fp.STATUS_ACCEPTED:
        pass
    assert rings["critical"].used_bytes == 0
    assert _offer(router, "critical", 150) == fp.STATUS_ACCEPTED  # over the limit, but it must progress
    assert _offer(router, "critical", 10) == (fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED)


def test_discard_returns_bytes_to_the_budget():
    router, rings, b = _router(10_000_000)
    _offer(router, "normal", 100)
    assert b.used_bytes > 0
    rings["normal"].discard_all()
    assert b.used_bytes == 0


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


def test_parts_of_one_batch_count_together_against_the_budget():
    budget = 1_000_000
    router = fp.Router(max_events_per_batch=100_000, max_event_bytes=1 << 20)
    b = fp.MemoryBudget(budget)
    for name in ("low1", "low2"):
        ring = fp.TypeRing(name, capacity_bytes=1 << 30, max_event_bytes=1 << 20)
        ring.attach_budget(b, int(budget * SHARE["low"]))
        router.add(ring)
    enc = fp.BatchEncoder()
    for i in range(300):  # about 330 kB per type: each fits the 500 kB share alone, not both
        for t in (b"low1", b"low2"):
            enc.add(t, struct.pack(">QQ", 1 if t == b"low1" else 2, i + 1), 1, None, b"x" * 1000)
    r = fp.FrameReader(1 << 24)
    r.feed(enc.finish(1))
    r.next_frame()
    statuses = sorted(res[1] for res in router.ingest(r, 1)[2])
    assert fp.STATUS_ACCEPTED in statuses and fp.STATUS_RETRY_LATER in statuses
    assert b.used_bytes <= budget * SHARE["low"]
