"""The Produce request codec around prebuilt record batches (no broker)."""

from __future__ import annotations

import struct

import pytest

from eventbroker.kafka.produce import NativeProduceRequest, encode_produce_body


def test_produce_body_layout():
    body = encode_produce_body(b"tp", [(3, b"AB"), (0, b"C")], 1500)
    assert body == (struct.pack(">hhii", -1, -1, 1500, 1) + struct.pack(">h", 2) + b"tp" + struct.pack(">i", 2)
                    + struct.pack(">ii", 3, 2) + b"AB" + struct.pack(">ii", 0, 1) + b"C")


def test_request_picks_a_supported_version():
    req = NativeProduceRequest(b"body")
    s = req.prepare({0: (0, 9)})
    assert s.API_VERSION == 7 and s.encode() == b"body"
    assert req.prepare({0: (0, 3)}).API_VERSION == 3
    from aiokafka.errors import IncompatibleBrokerVersion

    with pytest.raises(IncompatibleBrokerVersion):
        req.prepare({0: (0, 2)})


def test_zstd_batches_need_produce_v7():
    """zstd record batches need Kafka 2.1+ (Produce v7, KIP-110): an older
    broker gets a request error that names the fix, not a corrupt batch."""
    body = encode_produce_body(b"t", [(0, b"x")], 1000)
    assert NativeProduceRequest(body, zstd=True).prepare({0: (0, 9)}).API_VERSION == 7
    assert NativeProduceRequest(body).prepare({0: (0, 6)}).API_VERSION == 6
    with pytest.raises(Exception, match="zstd.*Kafka 2.1.*lz4"):
        NativeProduceRequest(body, zstd=True).prepare({0: (0, 6)})
