"""Everything eventbroker knows about Kafka, in one place.

- ``sink``: where units go (``KafkaSink`` over aiokafka's client, ``NullSink``);
- ``produce``: the Produce request codec around prebuilt record batches;
- ``errors``: what each Kafka error code means for us (``classify``, ``ProduceFailed``);
- ``writer``: ``TopicWriter``, the delivery machinery lanes and the spool share;
- ``slots``: produce requests in flight over all types, by priority;
- ``embedded``: the development broker (Tansu) started when none is configured.

It builds on ``config`` and the native core and imports nothing of the
gateway, the spool or operations.
"""
