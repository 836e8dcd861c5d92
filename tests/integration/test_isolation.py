"""A type whose topic cannot be written never stops the others (real broker)."""

from __future__ import annotations

import asyncio
import time

from conftest import daemon_address, read_topic
from eventbroker.client import Producer, ProducerClosed
from eventbroker.gateway.lane import LaneState


async def test_unwritable_topic_does_not_stop_other_types(daemon_factory, kafka_bootstrap):
    """Batches mixing a healthy type and one whose topic Kafka refuses: every
    healthy event is persisted; the other type is handed back retry-later."""
    types = {"play": {}, "broken": {"topic": ".."}}  # Kafka refuses the name ".."
    async with daemon_factory(types, kafka={"create_topics": False, "retry_backoff_ms": 50}) as d:
        p = Producer(daemon_address(d), linger_ms=1, max_inflight_batches=4)
        await p.start()
        try:
            t0 = time.monotonic()
            play, broken = [], []
            for i in range(2000):
                play.append(await p.send("play", b"p%d" % i))
                broken.append(await p.send("broken", b"b%d" % i))
            await asyncio.wait_for(asyncio.gather(*play), 30)
            elapsed = time.monotonic() - t0
            lane = d.router.lanes["broken"]
            deadline = time.monotonic() + 10
            while (lane.stats.sheds == 0 or p.stats["retried"] == 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert lane.stats.sheds >= 1 and lane.state is not LaneState.DELIVERING
            assert p.stats["retried"] > 0  # the broken type's events were handed back
            assert not any(f.done() for f in broken)
        finally:
            await p.close(timeout_s=0.5)
        assert all(isinstance(f.exception(), ProducerClosed) for f in broken)
        topic = d.router.lanes["play"].etype.topic
    assert len(read_topic(kafka_bootstrap, topic, 2000)) == 2000
    assert elapsed < 20
