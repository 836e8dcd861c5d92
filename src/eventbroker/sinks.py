"""Where drained events go: Kafka (aiokafka, acks=all) or nowhere (null sink).

The Kafka sink sends record batches that ``_fastpath`` already built (magic
v2, CRC-32C) in produce requests it encodes itself; aiokafka's client supplies
bootstrap, metadata, leader lookup, connections and response decoding.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import defaultdict
from typing import Protocol

import aiokafka.errors as Errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    IncompatibleBrokerVersion,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from aiokafka.protocol.produce import (
    ProduceRequest_v3,
    ProduceRequest_v4,
    ProduceRequest_v5,
    ProduceRequest_v6,
    ProduceRequest_v7,
)
from aiokafka.structs import TopicPartition

from eventbroker.config import EventType, KafkaConfig
from eventbroker.errors import DeliveryError

log = logging.getLogger("eventbroker.sinks")


def _prebuilt_struct(base: type) -> type:
    """A ProduceRequest struct of ``base``'s version whose body is already encoded."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def encode(self) -> bytes:
        return self._payload

    return type(f"Prebuilt{base.__name__}", (base,), {"__init__": __init__, "encode": encode})


# Produce v3-v7 share one request layout (v3 added transactional_id; later
# versions only widen what the response may say).
_PREBUILT = {cls.API_VERSION: _prebuilt_struct(cls) for cls in (
    ProduceRequest_v3, ProduceRequest_v4, ProduceRequest_v5, ProduceRequest_v6, ProduceRequest_v7)}


class NativeProduceRequest:
    """A Produce request whose body ``_fastpath`` and ``encode_produce_body`` built.

    It stands in for aiokafka's ``ProduceRequest`` in ``AIOKafkaClient.send``:
    aiokafka negotiates the version (``prepare``), frames the request, matches
    the response by correlation id and decodes it; it never re-encodes the
    record batches (aiokafka's own encoder copies a request's bytes once per
    nesting level, which cost more than everything else in the daemon).
    tests/test_kafka_sink.py pins this contract against the installed aiokafka.
    """

    __slots__ = ("_body",)
    API_KEY = 0
    required_acks = -1

    def __init__(self, body: bytes) -> None:
        self._body = body

    def prepare(self, versions: dict[int, tuple[int, int]]):
        lo, hi = versions.get(0, (3, 7))
        version = min(hi, 7)
        if version < max(lo, 3):
            raise IncompatibleBrokerVersion("eventbroker needs Produce v3 or newer (Kafka 0.11+)")
        return _PREBUILT[version](self._body)


# transactional_id length (-1: null), acks (-1: all), timeout_ms, topic count
_REQ_HEAD = struct.Struct(">hhii")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_PART_HEAD = struct.Struct(">ii")  # partition, record batch length


def encode_produce_body(topic: bytes, parts: list[tuple[int, bytes]], timeout_ms: int) -> bytes:
    """Produce v3+ body for one topic: acks=all, no transactional id."""
    pieces = [_REQ_HEAD.pack(-1, -1, timeout_ms, 1), _I16.pack(len(topic)), topic, _I32.pack(len(parts))]
    for partition, buf in parts:
        pieces.append(_PART_HEAD.pack(partition, len(buf)))
        pieces.append(buf)
    return b"".join(pieces)


# Errors after which the partition leaders may have moved: refresh metadata.
_METADATA_ERRORS = {3, 5, 6, 9, 13, 14, 15, 16, 19, 20}


class ProduceFailed(DeliveryError):
    """Some partitions of a unit were not acknowledged. ``errors`` describes
    each; ``codes`` holds the Kafka error code where the broker gave one.
    ``retriable`` is False when a broker error says retrying cannot help."""

    def __init__(self, topic: str, errors: dict[int, str], codes: dict[int, int] | None = None) -> None:
        super().__init__(f"{topic}: " + ", ".join(f"partition {p}: {e}" for p, e in sorted(errors.items())))
        self.errors = errors
        self.codes = codes or {}
        self.retriable = all(Errors.for_code(c).retriable or c in _METADATA_ERRORS for c in self.codes.values())


class Sink(Protocol):
    builds_batches: bool

    async def start(self, types: dict[str, EventType]) -> None: ...
    async def stop(self) -> None: ...
    async def partitions(self, topic: str) -> int: ...
    async def send(self, topic: str, batches: list[tuple[int, bytes, int]]) -> None: ...
    async def reachable(self) -> bool: ...


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

    async def reachable(self) -> bool:
        return True


class KafkaSink:
    """acks=all produce requests built from prebuilt record batches.

    aiokafka's client handles bootstrap, metadata, leader lookup, connections
    and response decoding; the request bodies are ours, so record bytes are
    copied once into the request and once by aiokafka's framing.
    """

    builds_batches = True

    def __init__(self, cfg: KafkaConfig, bootstrap_servers: str) -> None:
        self._cfg = cfg
        self._bootstrap = bootstrap_servers
        self._client: AIOKafkaClient | None = None
        self._reach_checked = 0.0
        self._reach_ok = False
        self._ready = False  # bootstrapped

    async def start(self, types: dict[str, EventType]) -> None:
        cfg = self._cfg
        if cfg.create_topics and types:
            await self._create_topics(types)
        self._client = AIOKafkaClient(
            bootstrap_servers=self._bootstrap,
            client_id=cfg.client_id,
            request_timeout_ms=cfg.request_timeout_ms,
            retry_backoff_ms=cfg.retry_backoff_ms,
            **cfg.client_security(),
        )
        try:
            await self._client.bootstrap()
            if types:
                await self._client.set_topics(sorted({t.topic for t in types.values()}))
        except BaseException:
            await self._client.close()
            self._client = None
            raise
        self._ready = True

    async def start_when_reachable(self, types: dict[str, EventType]) -> None:
        """``start`` again and again (with back-off) until Kafka answers."""
        delay = self._cfg.retry_backoff_ms / 1000
        attempts = 0
        while True:
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await self.start(types)
            except (KafkaError, OSError) as e:
                if attempts % 10 == 0:  # a persistent error (credentials, say) must not stay silent
                    log.warning("Kafka at %s still unreachable after %d attempts: %r", self._bootstrap, attempts, e)
                delay = min(delay * 2, self._cfg.retry_backoff_max_ms / 1000)
                continue
            log.info("Kafka reachable at %s; delivering", self._bootstrap)
            return

    def _client_or_raise(self) -> AIOKafkaClient:
        if self._client is None or not self._ready:
            raise Errors.KafkaConnectionError(f"not connected to Kafka at {self._bootstrap} yet")
        return self._client

    async def _create_topics(self, types: dict[str, EventType]) -> None:
        cfg = self._cfg
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{cfg.client_id}-admin",
            request_timeout_ms=cfg.request_timeout_ms,
            **cfg.client_security(),
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
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def reachable(self) -> bool:
        """Whether a broker answers a metadata request for our topics now (cached for a second)."""
        now = time.monotonic()
        if now - self._reach_checked < 1.0:
            return self._reach_ok
        self._reach_checked = now
        try:
            client = self._client_or_raise()
            self._reach_ok = bool(await asyncio.wait_for(client.force_metadata_update(), 2.0))
        except Exception:
            self._reach_ok = False
        return self._reach_ok

    async def partitions(self, topic: str) -> int:
        client = self._client_or_raise()
        parts = client.cluster.partitions_for_topic(topic)
        if not parts:
            await client.add_topic(topic)
            await client.force_metadata_update()
            parts = client.cluster.partitions_for_topic(topic)
        if not parts:
            raise UnknownTopicOrPartitionError(topic)
        return max(parts) + 1

    async def send(self, topic: str, batches: list[tuple[int, bytes, int]]) -> None:
        """Produce the batches; returns once Kafka acknowledged all of them.

        Batches that were acknowledged are removed from ``batches``, so a
        retry after a partial failure sends only the rest.
        """
        client = self._client_or_raise()
        by_node: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        errors: dict[int, str] = {}
        for partition, buf, _count in batches:
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            if leader is None or leader < 0:
                errors[partition] = "no leader known"
                continue
            by_node[leader].append((partition, buf))
        topic_b = topic.encode()
        timeout_ms = self._cfg.request_timeout_ms
        nodes = list(by_node)
        results = await asyncio.gather(
            *(client.send(n, NativeProduceRequest(encode_produce_body(topic_b, by_node[n], timeout_ms)))
              for n in nodes),
            return_exceptions=True,
        )
        done: set[int] = set()
        codes: dict[int, int] = {}
        refresh = bool(errors)
        for node, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                for partition, _ in by_node[node]:
                    errors[partition] = repr(res)
                refresh = True
                continue
            for _topic, partitions in res.topics:
                for pr in partitions:
                    partition, code = pr[0], pr[1]
                    if code == 0:
                        done.add(partition)
                    else:
                        errors[partition] = f"{Errors.for_code(code).__name__}"
                        codes[partition] = code
                        refresh = refresh or code in _METADATA_ERRORS
        batches[:] = [b for b in batches if b[0] not in done]
        if batches:
            if refresh:
                client.force_metadata_update()
            raise ProduceFailed(topic, errors or {b[0]: "no response for partition" for b in batches}, codes)
