"""Where drained events go: Kafka (aiokafka, acks=all) or nowhere (null sink).

The Kafka sink sends record batches that ``_fastpath`` already built (magic
v2, CRC-32C) in produce requests it encodes itself (``produce``); aiokafka's
client supplies bootstrap, metadata, leader lookup, connections and response
decoding. A sink also says how a unit is taken from a ring
(``take_unit``): the Kafka sink builds record batches, the null sink only
counts the entries off, so the lanes never branch on which sink they have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import aiokafka.errors as Errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError
from aiokafka.structs import TopicPartition

from eventbroker import _fastpath as fp
from eventbroker.config import EventType, KafkaConfig
from eventbroker.errors import ConfigError
from eventbroker.kafka.errors import ErrorClass, ProduceFailed, classify, error_name
from eventbroker.kafka.produce import NativeProduceRequest, encode_produce_body

log = logging.getLogger("eventbroker.sinks")  # the name the sink has always logged under

# (partition, record batch bytes, record count)
KafkaBatch = tuple[int, bytes, int]
# (batches, n_events, n_bytes, end_seq, end_off): TypeRing.build_unit's answer
UnitTaken = tuple[list[KafkaBatch], int, int, int, int]


def client_security(cfg: KafkaConfig) -> dict:
    """aiokafka keyword arguments for ``kafka.security_protocol`` (reads the password file)."""
    kw: dict = {"security_protocol": cfg.security_protocol}
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kw["ssl_context"] = create_ssl_context(cafile=cfg.ssl_ca_file or None,
                                               certfile=cfg.ssl_cert_file or None,
                                               keyfile=cfg.ssl_key_file or None)
    if cfg.security_protocol.startswith("SASL"):
        try:
            password = Path(cfg.sasl_password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"kafka.sasl_password_file: cannot read {cfg.sasl_password_file}: "
                              f"{e.strerror}") from None
        kw.update(sasl_mechanism=cfg.sasl_mechanism, sasl_plain_username=cfg.sasl_username,
                  sasl_plain_password=password)
    return kw


class Sink(Protocol):
    async def start(self, types: dict[str, EventType]) -> None: ...
    async def stop(self) -> None: ...
    async def partitions(self, topic: str) -> int: ...
    def take_unit(self, ring: fp.TypeRing, max_bytes: int, n_partitions: int,
                  sticky_partition: int) -> UnitTaken | None: ...
    async def send(self, topic: str, batches: list[KafkaBatch]) -> None: ...
    async def reachable(self) -> bool: ...


class BuildsRecordBatches:
    """``take_unit`` for a sink that sends Kafka record batches (one per partition)."""

    def take_unit(self, ring: fp.TypeRing, max_bytes: int, n_partitions: int,
                  sticky_partition: int) -> UnitTaken | None:
        return ring.build_unit(max_bytes, n_partitions, sticky_partition)


class NullSink:
    """Accepts everything at once: measures the gateway without Kafka."""

    async def start(self, types: dict[str, EventType]) -> None:
        log.warning("sink = \"null\": events are acknowledged and discarded (benchmarking only)")

    async def stop(self) -> None:
        pass

    async def partitions(self, topic: str) -> int:
        return 1

    def take_unit(self, ring: fp.TypeRing, max_bytes: int, n_partitions: int,
                  sticky_partition: int) -> UnitTaken | None:
        r = ring.skip_unit(max_bytes)  # nothing is sent: no record batches to build
        return None if r is None else ([], *r)

    async def send(self, topic: str, batches: list[KafkaBatch]) -> None:
        return None

    async def reachable(self) -> bool:
        return True


def _topics(types: dict[str, EventType]) -> set[str]:
    """Every topic the types write: theirs, and the dead-letter topics of those that keep schema failures."""
    return {t.topic for t in types.values()} | {t.dead_letter_topic for t in types.values() if t.dead_letter}


class KafkaSink(BuildsRecordBatches):
    """acks=all produce requests built from prebuilt record batches.

    aiokafka's client handles bootstrap, metadata, leader lookup, connections
    and response decoding; the request bodies are ours, so record bytes are
    copied once into the request and once by aiokafka's framing.
    """

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
            **client_security(cfg),
        )
        try:
            await self._client.bootstrap()
            if types:
                await self._client.set_topics(sorted(_topics(types)))
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
            **client_security(cfg),
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = sorted(_topics(types) - existing)
            if not missing:
                return
            dead_letter = {t.dead_letter_topic for t in types.values() if t.dead_letter}
            # A dead-letter topic is written to partition 0 only (schema failures are rare).
            new = [NewTopic(t, 1 if t in dead_letter else cfg.topic_partitions, cfg.replication_factor)
                   for t in missing]
            try:
                resp = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                return
            for topic, code, message in getattr(resp, "topic_errors", []):
                if code not in (0, TopicAlreadyExistsError.errno):
                    log.warning("could not create topic %s: error %s %s", topic, code, message or "")
                else:
                    log.info("created topic %s (%d partitions)", topic, 1 if topic in dead_letter else cfg.topic_partitions)
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

    async def send(self, topic: str, batches: list[KafkaBatch]) -> None:
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
        # attributes' codec bits (offset 22, low byte): 4 is zstd
        zstd = any(buf[22] & 7 == 4 for _, buf, _ in batches)
        results = await asyncio.gather(
            *(client.send(n, NativeProduceRequest(encode_produce_body(topic_b, by_node[n], timeout_ms), zstd))
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
                        errors[partition] = error_name(code)
                        codes[partition] = code
                        refresh = refresh or classify(code) is ErrorClass.REFRESH_METADATA
        batches[:] = [b for b in batches if b[0] not in done]
        if batches:
            if refresh:
                client.force_metadata_update()
            raise ProduceFailed(topic, errors or {b[0]: "no response for partition" for b in batches}, codes)
