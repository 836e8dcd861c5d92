"""Microbenchmarks of the native hot path (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-only

Each benchmark processes one batch frame of N events; ``extra_info`` records
ns per event, which is the figure to compare across payload sizes and
machines. There is no pure-Python twin of the fast path to compare against.
"""

from __future__ import annotations

import struct

import pytest

from eventbroker import _fastpath as fp
from eventbroker.protocol import Ack, AckEntry, encode_ack_body

SIZES = [16, 200, 1024, 16 * 1024]
MAX_FRAME = 64 * 1024 * 1024


def _events_for(size: int) -> int:
    return max(16, min(2000, (512 * 1024) // (size + 32)))


def _frame(n: int, size: int, types=(b"play", b"search", b"client_log"), key: bytes | None = None) -> bytes:
    enc = fp.BatchEncoder()
    payload = b"x" * size
    for i in range(n):
        enc.add(types[i % len(types)], struct.pack(">QQ", 1, i + 1), 1_700_000_000_000 + i, key, payload)
    return enc.finish(1)


def _router(ring_bytes: int = 1 << 30):
    router = fp.BatchSplitter(max_events_per_batch=1_000_000, max_event_bytes=1 << 20)
    rings = []
    for name in ("play", "search", "client_log"):
        ring = fp.TypeRing(name, capacity_bytes=ring_bytes, max_event_bytes=1 << 20, by_key=False)
        router.add(ring)
        rings.append(ring)
    return router, rings


def _per_event(benchmark, n: int) -> None:
    benchmark.extra_info["events_per_round"] = n
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_event"] = round(benchmark.stats.stats.median / n * 1e9, 1)


@pytest.mark.parametrize("size", SIZES)
def test_frame_split_and_checksum(benchmark, size):
    """FrameReader: split one batch frame out of the stream and verify its CRC-32C."""
    n = _events_for(size)
    frame = _frame(n, size)
    reader = fp.FrameReader(MAX_FRAME)

    def run():
        reader.feed(frame)
        assert reader.next_frame() == fp.FRAME_EVENT_BATCH
        assert reader.next_frame() == -1

    benchmark(run)
    _per_event(benchmark, n)


@pytest.mark.parametrize("size", SIZES)
def test_decode_route_into_rings(benchmark, size):
    """Router.ingest: check every event, split by type, write Kafka record tails into the rings."""
    n = _events_for(size)
    frame = _frame(n, size)
    reader = fp.FrameReader(MAX_FRAME)
    router, rings = _router()

    def run():
        reader.feed(frame)
        reader.next_frame()
        router.ingest(reader, 1_700_000_000_000)
        reader.next_frame()
        for ring in rings:  # drain without building, so memory stays flat
            r = ring.skip_unit(1 << 30)
            if r is not None:
                ring.release(r[1], r[2], r[3])

    benchmark(run)
    _per_event(benchmark, n)


@pytest.mark.parametrize("size", SIZES)
def test_kafka_record_batch_build(benchmark, size):
    """TypeRing.build_unit: Kafka v2 record batches (4 partitions, CRC-32C) from ring entries."""
    n = _events_for(size)
    frame = _frame(n, size, types=(b"play",))
    reader = fp.FrameReader(MAX_FRAME)
    router, rings = _router()
    ring = rings[0]

    def setup():
        reader.feed(frame)
        reader.next_frame()
        router.ingest(reader, 1_700_000_000_000)
        reader.next_frame()
        return (), {}

    def run():
        batches, n_events, n_bytes, end_seq, end_off = ring.build_unit(1 << 30, 4, 1)
        ring.release(n_bytes, end_seq, end_off)

    benchmark.pedantic(run, setup=setup, rounds=200, warmup_rounds=5)
    _per_event(benchmark, n)


def test_ack_encode(benchmark):
    """One ACK frame answering a three-type batch (per batch, not per event)."""
    entries = tuple(AckEntry(i, 0, 0, 700) for i in range(3))

    def run():
        return fp.encode_frame(4, encode_ack_body(12345, entries))

    frame = benchmark(run)
    assert Ack.decode(frame[12:]).batch_seq == 12345


@pytest.mark.parametrize("size", [200])
def test_sdk_batch_encode(benchmark, size):
    """BatchEncoder, as the SDK uses it: add N events, finish the frame."""
    n = 2000
    payload = b"x" * size
    ids = [struct.pack(">QQ", 1, i + 1) for i in range(n)]

    def run():
        enc = fp.BatchEncoder()
        add = enc.add
        for i in range(n):
            add(b"play", ids[i], 1_700_000_000_000, None, payload)
        return enc.finish(1)

    benchmark(run)
    _per_event(benchmark, n)


@pytest.mark.parametrize("personal", [False, True], ids=["nothing-personal", "two-personal-fields"])
def test_personal_fields_sealed_in_the_splitter(benchmark, personal, tmp_path):
    """The privacy scenario's events (loadgen json10p: 100,000 users, two personal
    fields) split into a ring with their schema: against schemas/plain, or
    schemas/private with every user's key cached (the warm gateway). The
    difference is what sealing costs per event in the splitter alone."""
    import os
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from eventbroker.config import Config, EventTypeConfig, SchemasConfig, resolve_types
    from eventbroker.schema import load_registry
    from loadgen import json10p_for

    name = "private" if personal else "plain"
    cfg = Config(schemas=SchemasConfig(dir=str(here / "schemas")), types={"t": EventTypeConfig(schema=name)})
    ring = fp.TypeRing("t", capacity_bytes=1 << 30, max_event_bytes=1 << 16)
    ring.schemas = load_registry(cfg, resolve_types(cfg)).get("t")
    keys = fp.UserKeys()
    keys.keys.update((b"u%06d" % u, os.urandom(32)) for u in range(100_000))
    ring.keys = keys
    splitter = fp.BatchSplitter(max_events_per_batch=10_000, max_event_bytes=1 << 16)
    splitter.add(ring)
    frames = []
    for b in range(50):
        enc = fp.BatchEncoder()
        for i in range(2000):
            idx = b * 2000 + i
            enc.add(b"t", struct.pack(">QQ", 7, idx + 1), 1_700_000_000_000, None, json10p_for(idx * 7))
        frames.append(enc.finish(b + 1))
    reader = fp.FrameReader(MAX_FRAME)
    now = 1_700_000_000_000

    def run():
        for f in frames:
            reader.feed(f)
            reader.next_frame()
            res = splitter.ingest_answering(reader, now, None)
            assert res[2][0][3] == 2000
            ring.discard_all()

    benchmark.pedantic(run, rounds=5, iterations=1)
    _per_event(benchmark, 100_000)
    benchmark.extra_info["values_sealed"] = keys.encrypted
