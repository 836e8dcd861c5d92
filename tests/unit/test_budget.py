"""The shared memory budget: priorities refused in order as it fills (native rings, no broker)."""

from __future__ import annotations

import struct

from eventbroker import _fastpath as fp
from eventbroker.config import PRIORITY_BUDGET_SHARE

SHARE = PRIORITY_BUDGET_SHARE


def _router(budget: int):
    router = fp.BatchSplitter(max_events_per_batch=100_000, max_event_bytes=1 << 20)
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


def test_parts_of_one_batch_count_together_against_the_budget():
    budget = 1_000_000
    router = fp.BatchSplitter(max_events_per_batch=100_000, max_event_bytes=1 << 20)
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
