"""The gateway: producers' connections in, per-type lanes out.

- ``server``: the listener (``IngestServer``), its connection limits, drain;
- ``connection``: one producer connection (``Connection``): frames in, ACKs out;
- ``router``: the native batch splitter in front of the lanes (``Router``),
  the registry of running types, reload;
- ``lane``: one type's ring and drain task (``Lane``), shedding and probing;
- ``acks``: the batch parts lanes answer, and who they answer to.

It builds on ``kafka`` (sinks, the topic writer, request slots),
``security``, ``config`` and the native core. The spool builds on it.
"""
