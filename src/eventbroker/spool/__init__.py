"""The disk spool: types with ``ack = "spool"`` are acknowledged once their
events are on local disk, and delivered to Kafka from there.

- ``log``: the per-type segment log (format, recovery, check and repair);
- ``layout``: where spools live (slots of workers, type.json);
- ``lane``: ``SpoolLane``, the gateway lane that writes the log and acks,
  and ``SpoolLanes``, the router's lane factory with a spool;
- ``forwarder``: ``Forwarder``, the log delivered to Kafka in order;
- ``adopt``: spools nobody owns any more, delivered by whoever can lock them;
- ``replay``: the offline delivery of ``eventbroker spool replay``.

It builds on the gateway (its lanes), ``kafka`` and ``config``.
"""
