"""The Produce request codec: request bodies built here around record batches
``_fastpath`` already built, sent through aiokafka's client."""

from __future__ import annotations

import struct

from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.produce import (
    ProduceRequest_v3,
    ProduceRequest_v4,
    ProduceRequest_v5,
    ProduceRequest_v6,
    ProduceRequest_v7,
)


def _prebuilt_struct(base: type) -> type:
    """A ProduceRequest struct of ``base``'s version whose body is already encoded."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def encode(self) -> bytes:
        return self._payload

    return type(f"Prebuilt{base.__name__}", (base,), {"__init__": __init__, "encode": encode})


# Produce v3-v7 share one request layout (v3 added transactional_id; later
# versions only widen what the response may say).
_PREBUILT = {cls.API_VERSION: _prebuilt_struct(cls) for cls in (
    ProduceRequest_v3, ProduceRequest_v4, ProduceRequest_v5, ProduceRequest_v6, ProduceRequest_v7)}


class NativeProduceRequest:
    """A Produce request whose body ``_fastpath`` and ``encode_produce_body`` built.

    It stands in for aiokafka's ``ProduceRequest`` in ``AIOKafkaClient.send``:
    aiokafka negotiates the version (``prepare``), frames the request, matches
    the response by correlation id and decodes it; it never re-encodes the
    record batches (aiokafka's own encoder copies a request's bytes once per
    nesting level, which cost more than everything else in the daemon).
    tests/test_kafka_sink.py pins this contract against the installed aiokafka.
    """

    __slots__ = ("_body", "_zstd")
    API_KEY = 0
    required_acks = -1

    def __init__(self, body: bytes, zstd: bool = False) -> None:
        self._body = body
        self._zstd = zstd  # zstd record batches need Produce v7 (KIP-110)

    def prepare(self, versions: dict[int, tuple[int, int]]):
        lo, hi = versions.get(0, (3, 7))
        version = min(hi, 7)
        if version < max(lo, 3):
            raise IncompatibleBrokerVersion("eventbroker needs Produce v3 or newer (Kafka 0.11+)")
        if self._zstd and version < 7:
            raise IncompatibleBrokerVersion("zstd-compressed record batches need Kafka 2.1+ (Produce v7); set "
                                            "the type's compression to lz4, snappy, gzip or none for this cluster")
        return _PREBUILT[version](self._body)


# transactional_id length (-1: null), acks (-1: all), timeout_ms, topic count
_REQ_HEAD = struct.Struct(">hhii")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_PART_HEAD = struct.Struct(">ii")  # partition, record batch length


def encode_produce_body(topic: bytes, parts: list[tuple[int, bytes]], timeout_ms: int) -> bytes:
    """Produce v3+ body for one topic: acks=all, no transactional id."""
    pieces = [_REQ_HEAD.pack(-1, -1, timeout_ms, 1), _I16.pack(len(topic)), topic, _I32.pack(len(parts))]
    for partition, buf in parts:
        pieces.append(_PART_HEAD.pack(partition, len(buf)))
        pieces.append(buf)
    return b"".join(pieces)
