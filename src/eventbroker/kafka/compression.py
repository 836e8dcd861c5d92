"""Compression of the record batches a type sends to Kafka.

Kafka compresses a record batch as a whole: the 61-byte header stays as it
is, the records after it are replaced by the codec's output, and attribute
bits 0-2 name the codec. ``BatchCompressor`` does that once per batch (a
unit has one batch per partition it touches), never per event: one codec
call, then ``_fastpath.compressed_record_batch`` for the header and CRC.

The codecs are cramjam's (the library aiokafka itself decodes with), in the
forms every Kafka client reads: gzip (RFC 1952), snappy in the xerial
framing the Java client writes, LZ4 frames with independent blocks (KIP-57)
and zstd frames.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import cramjam

from eventbroker import _fastpath as fp
from eventbroker.kafka.sink import KafkaBatch

# Kafka's attribute value per codec (record batch attributes, bits 0-2).
CODEC_IDS: dict[str, int] = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}

_XERIAL_HEADER = b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1)
_XERIAL_BLOCK = 32 * 1024
_BLOCK_LEN = struct.Struct(">i")


def _snappy_xerial(data: memoryview) -> bytes:
    parts = [_XERIAL_HEADER]
    for start in range(0, len(data), _XERIAL_BLOCK):
        block = bytes(cramjam.snappy.compress_raw(data[start:start + _XERIAL_BLOCK]))
        parts.append(_BLOCK_LEN.pack(len(block)))
        parts.append(block)
    return b"".join(parts)


def _compress_fn(codec: str, level: int) -> Callable[[memoryview], Any]:
    if codec == "zstd":
        return lambda data: cramjam.zstd.compress(data, level=level)
    if codec == "lz4":
        def lz4_frame(data: memoryview) -> Any:
            c = cramjam.lz4.Compressor(level=level, content_checksum=False, block_linked=False)
            c.compress(bytes(data))  # it takes bytes only: one copy of the records per batch
            return c.finish()
        return lz4_frame
    if codec == "gzip":
        return lambda data: cramjam.gzip.compress(data, level=level)
    if codec == "snappy":
        return _snappy_xerial
    raise ValueError(f"unknown compression {codec!r}")


class BatchCompressor:
    """Compresses the record batches of one type's units (codec and level as
    ``config.resolve_types`` checked them)."""

    __slots__ = ("codec", "level", "_id", "_fn")

    def __init__(self, codec: str, level: int) -> None:
        self.codec = codec
        self.level = level
        self._id = CODEC_IDS[codec]
        self._fn = _compress_fn(codec, level)

    def compress(self, batches: list[KafkaBatch]) -> tuple[list[KafkaBatch], int]:
        """Each batch compressed; also the bytes the compressed batches take."""
        out: list[KafkaBatch] = []
        total = 0
        for partition, batch, count in batches:
            packed = fp.compressed_record_batch(batch, self._id, self._fn(memoryview(batch)[fp.RECORD_BATCH_HEADER_BYTES:]))
            total += len(packed)
            out.append((partition, packed, count))
        return out, total


def compressor_for(codec: str, level: int) -> BatchCompressor | None:
    """None for ``compression = "none"``."""
    return None if codec == "none" else BatchCompressor(codec, level)
