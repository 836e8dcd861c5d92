"""The router's registry of lanes across reloads, with a spool and a fake sink (no broker)."""

from __future__ import annotations

import asyncio
import os
import time

from conftest import MiB
from eventbroker import _fastpath as fp
from eventbroker.config import EventType, KafkaConfig, ServerConfig, SpoolConfig
from eventbroker.gateway.router import Router
from eventbroker.kafka.sink import BuildsRecordBatches
from eventbroker.spool.lane import SpoolLane, SpoolLanes
from eventbroker.spool.log import lock_for_offline_use


def _type(name: str, ack: str) -> EventType:
    return EventType(name=name, topic=f"events.{name}", priority="normal", max_event_bytes=MiB,
                     partitioning="spread", ring_bytes=64 * MiB, enabled=True, ack=ack)  # type: ignore[arg-type]


class _KafkaAway(BuildsRecordBatches):
    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches):
        await asyncio.sleep(0.01)
        raise ConnectionError("kafka away")


class _Target:
    closed = False

    def part_persisted(self, *a) -> None:
        pass

    def part_retry(self, *a) -> None:
        pass


def _one_event(router: Router, name: bytes) -> None:
    enc = fp.BatchEncoder()
    enc.add(name, b"i" * 16, 1, None, b"payload")
    reader = fp.FrameReader(1 << 20)
    reader.feed(enc.finish(1))
    reader.next_frame()
    assert router.ingest(reader, 1, None, _Target())[1:3] == ([], 1)


async def test_a_type_removed_twice_leaves_both_retiring_lanes_stopped_by_stop(tmp_path):
    """Spooled type removed while Kafka is away (its spool keeps its event),
    added back as a Kafka-acked type (a new lane), removed again: stopping the
    router still stops the first lane, saves its checkpoint and closes its spool."""
    scfg = SpoolConfig(dir=str(tmp_path))
    kcfg = KafkaConfig(retry_backoff_ms=10, retry_backoff_max_ms=50)
    srv = ServerConfig(drain_timeout_ms=200)
    router = Router({"audit": _type("audit", "spool")}, _KafkaAway(), kcfg, srv, SpoolLanes(scfg))
    router.start()
    _one_event(router, b"audit")
    spooled = router.lanes["audit"]
    assert isinstance(spooled, SpoolLane)
    for _ in range(100):
        if spooled.idle:
            break
        await asyncio.sleep(0.01)
    assert spooled.forwarder.backlog_bytes > 0  # acknowledged from the spool, not yet in Kafka
    assert router.reconfigure({}, kcfg, srv, scfg) == ["removed type audit"]
    assert router.reconfigure({"audit": _type("audit", "kafka")}, kcfg, srv, scfg) == ["added type audit"]
    assert router.lanes["audit"] is not spooled
    assert router.reconfigure({}, kcfg, srv, scfg) == ["removed type audit"]
    assert router.spooled_type_names() == {"audit"}  # the first lane still holds its spool directory
    await router.stop(time.monotonic() + 0.3)
    assert spooled.forwarder.stopping
    os.close(lock_for_offline_use(tmp_path / "audit"))  # its spool was closed: the lock is free again
    left = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not [n for n in left if "audit" in n], left


async def test_only_spooled_lanes_hold_spool_directories(tmp_path):
    """The adopter may deliver the spool of a type that is now Kafka-acked: the
    router claims only the directories of its spooled lanes."""
    scfg = SpoolConfig(dir=str(tmp_path))
    router = Router({"audit": _type("audit", "spool"), "play": _type("play", "kafka")}, _KafkaAway(),
                    KafkaConfig(), ServerConfig(), SpoolLanes(scfg))
    try:
        assert router.spooled_type_names() == {"audit"}
    finally:
        await router.stop(time.monotonic())
