"""Where drained events go: Kafka (aiokafka, acks=all) or nowhere (null sink).

The Kafka sink hands aiokafka record batches that ``_fastpath`` already built
(magic v2, CRC-32C), so aiokafka does per-batch work only: metadata, leader
routing, the produce request and its retries. ``PrebuiltBatch`` stands in for
aiokafka's ``BatchBuilder`` in ``send_batch``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from eventbroker.config import EventType, KafkaConfig

log = logging.getLogger("eventbroker.sinks")


class PrebuiltBatch:
    """A finished Kafka record batch in the shape aiokafka's accumulator expects.

    aiokafka (0.11-0.14) calls ``closed``, ``size``, ``record_count``,
    ``_set_producer_state`` and ``_build`` on what ``send_batch`` is given;
    tests/test_kafka_batches.py pins that contract against the installed
    aiokafka.
    """

    __slots__ = ("_buffer", "_count")

    def __init__(self, buffer: bytes, count: int) -> None:
        self._buffer = buffer
        self._count = count

    def append(self, **_kw: Any) -> None:
        return None  # always closed: nothing more fits

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._buffer)

    def record_count(self) -> int:
        return self._count

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        if producer_id != -1:
            raise RuntimeError("prebuilt batches do not support idempotent or transactional producers")

    def _build(self) -> bytes:
        return self._buffer


class Sink(Protocol):
    builds_batches: bool

    async def start(self, types: dict[str, EventType]) -> None: ...
    async def stop(self) -> None: ...
    async def partitions(self, topic: str) -> int: ...
    async def send(self, topic: str, batches: list[tuple[int, bytes, int]]) -> None: ...


class NullSink:
    """Accepts everything at once: measures the gateway without Kafka."""

    builds_batches = False

    async def start(self, types: dict[str, EventType]) -> None:
        log.warning("sink = \"null\": events are acknowledged and discarded (benchmarking only)")

    async def stop(self) -> None:
        pass

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic: str, batches: list[tuple[int, bytes, int]]) -> None:
        return None


class KafkaSink:
    """aiokafka producer with acks=all, fed with prebuilt record batches."""

    builds_batches = True

    def __init__(self, cfg: KafkaConfig, bootstrap_servers: str) -> None:
        self._cfg = cfg
        self._bootstrap = bootstrap_servers
        self._producer: AIOKafkaProducer | None = None

    async def start(self, types: dict[str, EventType]) -> None:
        cfg = self._cfg
        if cfg.create_topics and types:
            await self._create_topics(types)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=cfg.request_timeout_ms,
            retry_backoff_ms=cfg.retry_backoff_ms,
            max_request_size=max(cfg.batch_max_bytes + 65536, 1048576),
            linger_ms=0,
        )
        await self._producer.start()

    async def _create_topics(self, types: dict[str, EventType]) -> None:
        cfg = self._cfg
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{cfg.client_id}-admin",
            request_timeout_ms=cfg.request_timeout_ms,
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = sorted({t.topic for t in types.values()} - existing)
            if not missing:
                return
            new = [NewTopic(t, cfg.topic_partitions, cfg.replication_factor) for t in missing]
            try:
                resp = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                return
            for topic, code, message in getattr(resp, "topic_errors", []):
                if code not in (0, TopicAlreadyExistsError.errno):
                    log.warning("could not create topic %s: error %s %s", topic, code, message or "")
                else:
                    log.info("created topic %s (%d partitions)", topic, cfg.topic_partitions)
        except KafkaError as e:
            log.warning("topic creation failed (%s); relying on the broker's auto-creation", e)
        finally:
            await admin.close()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def partitions(self, topic: str) -> int:
        assert self._producer is not None
        parts = await self._producer.partitions_for(topic)
        if not parts:
            raise KafkaError(f"topic {topic} has no partitions")
        return max(parts) + 1

    async def send(self, topic: str, batches: list[tuple[int, bytes, int]]) -> None:
        """Produce the batches; returns once Kafka acknowledged all of them."""
        producer = self._producer
        assert producer is not None
        futs = []
        for partition, buf, count in batches:
            futs.append(await producer.send_batch(PrebuiltBatch(buf, count), topic, partition=partition))
        results = await asyncio.gather(*futs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
