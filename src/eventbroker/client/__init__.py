"""Producer SDK: ``Producer`` (asyncio) and ``SyncProducer`` (blocking).

- ``producer``: the public asyncio API (batching, windows, resends);
- ``connection``: one connection to a gateway (frames, TLS);
- ``batches``: event ids and what is kept per event and batch until acked;
- ``address``: the server list;
- ``sync``: the blocking wrapper on a loop thread of its own.

The SDK builds on ``protocol``, ``errors`` and the native encoder only: it
imports nothing of the server side.
"""

from eventbroker.client.batches import IdGenerator
from eventbroker.client.producer import Producer
from eventbroker.client.sync import SyncProducer
from eventbroker.errors import EventRejected, ProducerClosed, ServerError

__all__ = ["EventRejected", "IdGenerator", "Producer", "ProducerClosed", "ServerError", "SyncProducer"]
