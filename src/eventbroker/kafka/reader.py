"""Reading a type's topic back (``eventbroker tail``), with the daemon's own
Kafka settings (security protocol, SASL, TLS)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from eventbroker.config import KafkaConfig
from eventbroker.kafka.sink import client_security


async def open_topic(cfg: KafkaConfig, bootstrap: str, topic: str, *, from_start: bool) -> tuple[AIOKafkaConsumer, bool]:
    """A started consumer of ``topic`` (no group, no commits) and whether the
    topic exists yet. It looks before it subscribes: subscribing asks for the
    topic's metadata, and a broker that creates topics on demand would create it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest" if from_start else "latest",
        enable_auto_commit=False,
        group_id=None,
        **client_security(cfg),
    )
    try:
        await consumer.start()
        exists = topic in await consumer.topics()
        consumer.subscribe([topic])
    except BaseException:
        await consumer.stop()
        raise
    return consumer, exists
