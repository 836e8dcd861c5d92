"""What a lane answers to: the producers' batch parts waiting for Kafka.

A producer's batch carries events of several types; the events of one type
in one batch are a *batch part*. A lane takes its ring's entries into units
in order, and each unit covers whole or partial batch parts. When every
event of a part has been delivered (Kafka acknowledged the units, or the
spool holds them), the part's connection is told, and it sends the ACK
entry. All of this is per batch part, never per event.
"""

from __future__ import annotations

import time
from typing import Protocol


class AckTarget(Protocol):
    """A producer's batch, as lanes see it (gateway/connection.py)."""

    @property
    def closed(self) -> bool: ...  # the connection is gone: nobody to answer

    def part_persisted(self, batch_seq: int, type_index: int, count: int) -> None: ...

    def part_retry(self, batch_seq: int, type_index: int, count: int, reason: int, retry_after_ms: int) -> None: ...


class BatchPart:
    __slots__ = ("target", "batch_seq", "type_index", "count", "unassigned", "unacked", "created")

    def __init__(self, target: AckTarget, batch_seq: int, type_index: int, count: int) -> None:
        self.target = target
        self.batch_seq = batch_seq
        self.type_index = type_index
        self.count = count
        self.unassigned = count  # events not yet taken into a unit
        self.unacked = count  # events not yet delivered
        self.created = time.monotonic()
