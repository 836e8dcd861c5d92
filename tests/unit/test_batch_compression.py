"""Record-batch compression: each codec's batch is what Kafka clients decode
(aiokafka's own record reader is the judge here; test_compression in
integration reads them back from a broker with librdkafka and aiokafka)."""

from __future__ import annotations

import time

import msgspec
import pytest
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from test_lanes import _ingest, _Target, _until

from conftest import make_config
from eventbroker import _fastpath as fp
from eventbroker.config import Config, EventTypeConfig, TypeDefaults, resolve_types
from eventbroker.gateway.router import Router
from eventbroker.kafka.compression import CODEC_IDS, BatchCompressor
from eventbroker.kafka.sink import BuildsRecordBatches


def _batch(n: int) -> bytes:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=10_000_000)
    for i in range(n):
        b.append(i, timestamp=1_700_000_000_000 + i, key=b"k%d" % (i % 7) if i % 2 else None,
                 value=b'{"i":%d,"pad":"%s"}' % (i, b"abc" * (i % 40)), headers=[("eb.id", i.to_bytes(16, "big"))])
    return bytes(b.build())


def _records(buf: bytes) -> list[tuple]:
    batch = DefaultRecordBatch(buf)
    assert batch.validate_crc()
    return [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in batch]


@pytest.mark.parametrize(("codec", "level"), [("zstd", 1), ("zstd", -3), ("zstd", 19), ("lz4", 1), ("lz4", 9),
                                              ("gzip", 6), ("snappy", 0)])
def test_each_codec_makes_a_batch_kafka_clients_decode(codec, level):
    raw = _batch(5000)  # snappy: over 32 KiB, so several xerial blocks
    [(p, packed, count)], size = BatchCompressor(codec, level).compress([(3, raw, 5000)])
    assert (p, count) == (3, 5000) and size == len(packed) < len(raw) / 2
    assert DefaultRecordBatch(packed).compression_type == CODEC_IDS[codec]
    assert raw[:8] == packed[:8] and raw[12:17] == packed[12:17] and raw[23:61] == packed[23:61]
    assert _records(packed) == _records(raw)


def test_the_header_is_checked():
    with pytest.raises(ValueError, match="record batch"):
        fp.compressed_record_batch(b"\x00" * 70, 4, b"x")
    with pytest.raises(ValueError, match="codec"):
        fp.compressed_record_batch(_batch(1), 5, b"x")


def _types(defaults: dict | None = None, **type_opts):
    return resolve_types(Config(defaults=TypeDefaults(**(defaults or {})), types={"play": EventTypeConfig(**type_opts)}))


def test_compression_defaults_and_levels():
    assert (_types()["play"].compression, _types()["play"].compression_level) == ("zstd", 1)
    assert _types(compression="gzip")["play"].compression_level == 6
    assert _types(compression="snappy")["play"].compression_level == 0
    assert _types({"compression": "lz4", "compression_level": 9})["play"].compression_level == 9
    # the default's level is not carried over to another codec
    assert _types({"compression_level": 19}, compression="gzip")["play"].compression_level == 6
    with pytest.raises(ValueError, match=r"types\.play\.compression_level.*outside 1\.\.9 for gzip"):
        _types(compression="gzip", compression_level=12)
    with pytest.raises(ValueError, match=r"defaults\.compression_level.*outside -7\.\.22 for zstd"):
        _types({"compression_level": 30})
    with pytest.raises(ValueError, match=r"types\.play\.compression_level.*snappy takes no level"):
        _types(compression="snappy", compression_level=3)


class _RecordingSink(BuildsRecordBatches):
    def __init__(self) -> None:
        self.batches: list[bytes] = []

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches):
        self.batches += [b for _, b, _ in batches]
        batches.clear()


async def test_a_lane_compresses_each_unit_and_a_reload_changes_the_codec():
    cfg = make_config("unused:1", {"play": {"compression": "zstd"}}, kafka={"linger_ms": 0})
    types = resolve_types(cfg)
    sink = _RecordingSink()
    router = Router(types, sink, cfg.kafka, cfg.server)
    target = _Target()
    _ingest(router, target, 1, [b"play"], 500)
    router.start()
    try:
        await _until(lambda: len(target.answers) == 1)
        lane = router.lanes["play"]
        lane.update(msgspec.structs.replace(types["play"], compression="lz4", compression_level=1), cfg.kafka,
                    router.budget_limit_bytes, cfg.spool)
        _ingest(router, target, 2, [b"play"], 500)
        await _until(lambda: len(target.answers) == 2)
        snap = lane.snapshot()
    finally:
        await router.stop(time.monotonic())
    assert [DefaultRecordBatch(b).compression_type for b in sink.batches] == [CODEC_IDS["zstd"], CODEC_IDS["lz4"]]
    assert sum(len(_records(b)) for b in sink.batches) == 1000
    assert snap.compressed_bytes == sum(len(b) for b in sink.batches) < snap.batch_bytes / 4
