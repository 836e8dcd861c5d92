"""Producer SDK: ``Producer`` (asyncio) and ``SyncProducer`` (blocking).

- ``producer``: the public asyncio API (produce/send, reports, windows, resends);
- ``connection``: one connection to a gateway (frames, TLS);
- ``address``: the server list;
- ``sync``: the blocking wrapper on a loop thread of its own.

Per-event work (ids, timestamps, batch encoding, what is kept until the
gateway answers) is native: ``_fastpath.ProducerCore`` and ``OutBatch``.
The SDK builds on ``protocol``, ``errors`` and the native module only: it
imports nothing of the server side.
"""

from eventbroker.client.producer import BatchReport, FlushReport, Producer
from eventbroker.client.sync import SyncProducer
from eventbroker.errors import BufferFull, EventRejected, ProducerClosed, ServerError

__all__ = ["BatchReport", "BufferFull", "EventRejected", "FlushReport", "Producer", "ProducerClosed", "ServerError",
           "SyncProducer"]
