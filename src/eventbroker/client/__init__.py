"""Producer SDK: ``Producer`` (asyncio) and ``SyncProducer`` (blocking)."""

from eventbroker.client.producer import IdGenerator, Producer
from eventbroker.client.sync import SyncProducer
from eventbroker.errors import EventRejected, ProducerClosed, ServerError

__all__ = ["EventRejected", "IdGenerator", "Producer", "ProducerClosed", "ServerError", "SyncProducer"]
