"""What the producer keeps per event and per batch until the gateway answers."""

from __future__ import annotations

import itertools
import os


class IdGenerator:
    """16-byte event ids: 8 random bytes per generator, then a counter."""

    __slots__ = ("_prefix", "_counter")

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = itertools.count(1)

    def __call__(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(8, "big")


class Pending:
    """One event waiting for its acknowledgement."""

    __slots__ = ("type", "event_id", "timestamp_ms", "key", "payload", "future")

    def __init__(self, type_: bytes, event_id: bytes, ts: int, key: bytes | None, payload: bytes, fut) -> None:
        self.type = type_
        self.event_id = event_id
        self.timestamp_ms = ts
        self.key = key
        self.payload = payload
        self.future = fut


class Batch:
    __slots__ = ("seq", "frame", "events", "by_type", "answered", "left", "sent_at")

    def __init__(self, seq: int, frame: bytes, events: list[Pending], type_of: list[int]) -> None:
        self.seq = seq
        self.frame = frame
        self.events = events
        self.by_type: dict[int, list[int]] = {}
        for i, ti in enumerate(type_of):
            self.by_type.setdefault(ti, []).append(i)
        self.answered = bytearray(len(events))
        self.left = len(events)
        self.sent_at = 0.0
