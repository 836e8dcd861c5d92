"""Unit tests of the native fast path (``eventbroker._fastpath``) and the
control-frame codecs in ``eventbroker.protocol``: no sockets, no broker.

Kafka record batches built by ``TypeRing.build_unit`` are parsed with
aiokafka's own reader, so the checks do not rely on our own encoder's idea of
the format.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from aiokafka.record.default_records import DefaultRecordBatch

from eventbroker import _fastpath as fp
from eventbroker import protocol
from eventbroker.errors import ProtocolError
from eventbroker.protocol import (
    Ack,
    AckEntry,
    ErrorCode,
    ErrorFrame,
    FrameType,
    Goaway,
    GoawayReason,
    Hello,
    Reason,
    Status,
    Welcome,
    encode_ack_body,
)

KAFKA_BATCH_HEADER_BYTES = 61  # fixed part of a magic v2 record batch
BIG = 1 << 24

# --------------------------------------------------------------------------
# helpers


def slow_crc32c(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC-32C (reflected polynomial 0x82F63B78), one bit at a time."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def as_int32(u: int) -> int:
    return u - (1 << 32) if u & 0x80000000 else u


def eid(i: int) -> bytes:
    """A distinct, non-zero 16-byte event id."""
    return (i + 1).to_bytes(16, "big")


def raw_frame(frame_type: int, body: bytes, *, flags: int = 0, reserved: int = 0) -> bytes:
    """A frame built by hand (any type/flags/reserved) with a correct checksum."""
    head = struct.pack(">BBH", frame_type, flags, reserved)
    crc = slow_crc32c(head + body)
    return struct.pack(">I", len(body)) + head + struct.pack(">I", crc) + body


def drain(reader: fp.FrameReader) -> list[tuple[int, bytes]]:
    out = []
    while (t := reader.next_frame()) != -1:
        out.append((t, reader.body()))
    return out


def reader_on(frame: bytes, max_frame_bytes: int = BIG) -> fp.FrameReader:
    """A reader positioned on ``frame`` (the only frame fed)."""
    r = fp.FrameReader(max_frame_bytes)
    r.feed(frame)
    assert r.next_frame() == frame[4]
    return r


_EV = struct.Struct(">HHIq16s")


def raw_event(
    ti: int,
    payload: bytes,
    *,
    key: bytes = b"",
    ts: int = 0,
    event_id: bytes = b"\x01" * 16,
    klen: int | None = None,
    vlen: int | None = None,
) -> bytes:
    """One event as on the wire; ``klen``/``vlen`` may lie about the lengths."""
    k = len(key) if klen is None else klen
    v = len(payload) if vlen is None else vlen
    return _EV.pack(ti, k, v, ts, event_id) + key + payload


def raw_body(names: list[bytes], events: list[bytes], *, seq: int = 1, count: int | None = None) -> bytes:
    """An EVENT_BATCH body built by hand, independently of BatchEncoder."""
    out = struct.pack(">QH", seq, len(names))
    for n in names:
        out += bytes([len(n)]) + n
    out += struct.pack(">I", len(events) if count is None else count)
    return out + b"".join(events)


def make_ring(name: str, **kw) -> fp.TypeRing:
    kw.setdefault("capacity_bytes", BIG)
    kw.setdefault("max_event_bytes", 1 << 20)
    return fp.TypeRing(name, **kw)


def make_router(
    *rings: fp.TypeRing, max_events_per_batch: int = 10_000, max_event_bytes: int = 1 << 20
) -> fp.BatchSplitter:
    router = fp.BatchSplitter(max_events_per_batch=max_events_per_batch, max_event_bytes=max_event_bytes)
    for ring in rings:
        router.add(ring)
    return router


def ingest_events(router: fp.BatchSplitter, events, now_ms: int, seq: int = 1):
    """Encode ``events`` ((type, id, ts, key, value) tuples) and ingest them."""
    enc = fp.BatchEncoder()
    for typ, ident, ts, key, value in events:
        enc.add(typ.encode(), ident, ts, key, value)
    return router.ingest(reader_on(enc.finish(seq)), now_ms)


def parse_batches(batches, n_partitions: int) -> dict[int, list]:
    """Parse a unit's record batches with aiokafka; check every batch-level field."""
    out: dict[int, list] = {}
    for partition, buf, count in batches:
        assert 0 <= partition < n_partitions
        assert partition not in out, "one batch per partition per unit"
        batch = DefaultRecordBatch(bytearray(buf))
        assert batch.validate_crc()
        assert batch.magic == 2
        assert batch.base_offset == 0
        assert batch.attributes == 0  # no compression, create time, not transactional
        assert batch.producer_id == -1
        assert batch.producer_epoch == -1
        assert batch.base_sequence == -1
        records = list(batch)
        assert len(records) == count
        assert [r.offset for r in records] == list(range(count))
        assert batch.last_offset_delta == count - 1
        assert batch.first_timestamp == records[0].timestamp
        assert batch.max_timestamp == max(r.timestamp for r in records)
        out[partition] = records
    return out


def expected_headers(typ: str, ident: bytes, ts: int, now_ms: int) -> list[tuple[str, bytes]]:
    return [
        ("eb.id", ident),
        ("eb.type", typ.encode()),
        ("eb.ts", struct.pack(">q", ts)),
        ("eb.recv_ts", struct.pack(">q", now_ms)),
    ]


def assert_ring_empty(ring: fp.TypeRing) -> None:
    assert ring.pending_events == 0
    assert ring.pending_bytes == 0
    assert ring.used_bytes == 0
    assert ring.events_in == 0
    assert ring.build_unit(BIG, 1, 0) is None


# --------------------------------------------------------------------------
# checksums and hashing


def test_crc32c_known_vectors():
    """CRC-32C of the standard check string and of nothing."""
    assert fp.crc32c(b"123456789") == 0xE3069283
    assert fp.crc32c(b"") == 0
    assert slow_crc32c(b"123456789") == 0xE3069283  # the reference itself is right


def test_crc32c_matches_bitwise_reference():
    """The table/hardware CRC equals the bitwise one for every length and alignment."""
    rng = random.Random(1)
    blob = bytes(rng.randrange(256) for _ in range(600))
    view = memoryview(blob)
    for start in range(9):
        for n in list(range(0, 40)) + [63, 64, 65, 255, 511, 591 - start]:
            chunk = view[start : start + n]
            assert fp.crc32c(chunk) == slow_crc32c(bytes(chunk)), (start, n)


def test_crc32c_continues_from_previous_value_and_takes_any_buffer():
    """crc32c(b, crc32c(a)) == crc32c(a + b); bytes, bytearray and memoryview agree."""
    a, b = os.urandom(37), os.urandom(101)
    assert fp.crc32c(b, fp.crc32c(a)) == fp.crc32c(a + b) == slow_crc32c(a + b)
    assert fp.crc32c(bytearray(a)) == fp.crc32c(memoryview(a)) == fp.crc32c(a)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"abc", 479470107),
    ],
)
def test_murmur2_kafka_vectors(data, expected):
    """murmur2 reproduces the vectors from Kafka's own test suite (as signed int32)."""
    assert as_int32(fp.murmur2(data)) == expected


def test_murmur2_matches_aiokafka_for_every_tail_length():
    """murmur2 agrees with aiokafka's pure-Python port for lengths 0..40 (all tails)."""
    rng = random.Random(2)
    for n in range(41):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert fp.murmur2(data) == aiokafka_murmur2(data), n


# --------------------------------------------------------------------------
# framing


def test_encode_frame_layout():
    """encode_frame writes length, type, zero flags/reserved and CRC-32C of bytes 4..7 + body."""
    body = b"hello body"
    frame = fp.encode_frame(FrameType.ACK, body)
    assert len(frame) == protocol.FRAME_HEADER_BYTES + len(body)
    assert struct.unpack(">I", frame[:4])[0] == len(body)
    assert frame[4] == FrameType.ACK
    assert frame[5:8] == b"\x00\x00\x00"
    assert struct.unpack(">I", frame[8:12])[0] == slow_crc32c(frame[4:8] + body)
    assert frame[12:] == body
    assert frame == raw_frame(FrameType.ACK, body)


def _sample_frames() -> list[tuple[int, bytes]]:
    rng = random.Random(3)
    frames = [(1, b""), (3, b"x"), (7, bytes(range(256)) * 3)]
    frames += [(rng.randint(1, 7), os.urandom(rng.randrange(0, 40))) for _ in range(5)]
    return frames


def test_reader_frames_split_at_every_byte_position():
    """Two feeds split anywhere in the stream yield exactly the frames sent."""
    frames = _sample_frames()
    stream = b"".join(fp.encode_frame(t, b) for t, b in frames)
    for cut in range(len(stream) + 1):
        r = fp.FrameReader(BIG)
        r.feed(stream[:cut])
        got = drain(r)
        r.feed(stream[cut:])
        got += drain(r)
        assert got == frames, cut
        assert r.buffered_bytes == 0
        assert r.frames_read == len(frames)


def test_reader_byte_by_byte():
    """Feeding one byte at a time yields the same frames."""
    frames = _sample_frames()
    stream = b"".join(fp.encode_frame(t, b) for t, b in frames)
    r = fp.FrameReader(BIG)
    got = []
    for i in range(len(stream)):
        r.feed(stream[i : i + 1])
        got += drain(r)
    assert got == frames


def test_reader_many_frames_in_one_feed():
    """Hundreds of frames in one buffer come out in order, bodies and lengths intact."""
    rng = random.Random(4)
    frames = [(rng.randint(1, 7), os.urandom(rng.randrange(0, 300))) for _ in range(500)]
    r = fp.FrameReader(BIG)
    r.feed(bytearray(b"".join(fp.encode_frame(t, b) for t, b in frames)))
    got = []
    while (t := r.next_frame()) != -1:
        assert r.frame_type == t
        assert r.body_length == len(r.body())
        got.append((t, r.body()))
    assert got == frames
    assert r.frames_read == 500


def test_reader_buffered_bytes_for_partial_frame():
    """A partial frame (header or body) is held back and counted in buffered_bytes."""
    frame = fp.encode_frame(FrameType.HEARTBEAT, b"12345678")
    for k in (1, 5, 11, 12, 13, len(frame) - 1):
        r = fp.FrameReader(BIG)
        src = bytearray(frame[:k])
        r.feed(src)
        assert r.next_frame() == -1
        assert r.buffered_bytes == k
        src[:] = b"\xff" * k  # the reader kept its own copy of the partial bytes
        r.feed(frame[k:])
        assert drain(r) == [(FrameType.HEARTBEAT, b"12345678")]
        assert r.buffered_bytes == 0


def test_reader_partial_frame_after_complete_one():
    """After a complete frame, the next frame's first bytes are what stays buffered."""
    f1 = fp.encode_frame(FrameType.HELLO, b"a")
    f2 = fp.encode_frame(FrameType.GOAWAY, b"bcdef")
    r = fp.FrameReader(BIG)
    r.feed(f1 + f2[:7])
    assert drain(r) == [(FrameType.HELLO, b"a")]
    assert r.buffered_bytes == 7
    r.feed(f2[7:])
    assert drain(r) == [(FrameType.GOAWAY, b"bcdef")]


@pytest.mark.parametrize("where", ["body", "crc", "length_byte"])
def test_reader_bad_checksum(where):
    """A changed body byte or checksum byte raises BAD_CHECKSUM."""
    frame = bytearray(fp.encode_frame(FrameType.ERROR, b"some body bytes"))
    if where == "body":
        frame[15] ^= 0x40
    elif where == "crc":
        frame[10] ^= 0x01
    else:
        frame[3] -= 1  # one byte shorter: the checksum no longer covers the same bytes
    r = fp.FrameReader(BIG)
    r.feed(frame)
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.code == fp.ERR_BAD_CHECKSUM == ErrorCode.BAD_CHECKSUM


def test_reader_frame_too_large_raised_at_header():
    """A body over max_frame_bytes is refused from the 12 header bytes alone."""
    r = fp.FrameReader(100)
    r.feed(fp.encode_frame(FrameType.ACK, b"x" * 100))
    assert drain(r) == [(FrameType.ACK, b"x" * 100)]  # exactly at the limit is fine
    r = fp.FrameReader(100)
    r.feed(fp.encode_frame(FrameType.ACK, b"x" * 101)[:12])
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.code == fp.ERR_FRAME_TOO_LARGE == ErrorCode.FRAME_TOO_LARGE


def test_reader_header_not_checked_before_complete():
    """Eleven bytes of a too-large header are simply waited on."""
    r = fp.FrameReader(100)
    r.feed(fp.encode_frame(FrameType.ACK, b"x" * 101)[:11])
    assert r.next_frame() == -1
    assert r.buffered_bytes == 11


@pytest.mark.parametrize("frame_type", [0, 8, 255])
def test_reader_unknown_frame_type(frame_type):
    """Frame types outside 1..7 raise UNKNOWN_FRAME_TYPE even with a valid checksum."""
    r = fp.FrameReader(BIG)
    r.feed(raw_frame(frame_type, b"body"))
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.code == fp.ERR_UNKNOWN_FRAME_TYPE == ErrorCode.UNKNOWN_FRAME_TYPE


@pytest.mark.parametrize("flags, reserved", [(1, 0), (0x80, 0), (0, 1), (0, 0x100), (0, 0xFFFF)])
def test_reader_nonzero_reserved_header_bytes(flags, reserved):
    """Non-zero flags or reserved bytes raise MALFORMED_FRAME even with a valid checksum."""
    r = fp.FrameReader(BIG)
    r.feed(raw_frame(FrameType.HEARTBEAT, b"\x00" * 8, flags=flags, reserved=reserved))
    with pytest.raises(ProtocolError) as ei:
        r.next_frame()
    assert ei.value.code == fp.ERR_MALFORMED_FRAME == ErrorCode.MALFORMED_FRAME


def test_reader_good_frames_before_a_bad_one_are_delivered():
    """Frames before a corrupt frame are returned; the corrupt one raises."""
    good = fp.encode_frame(FrameType.HELLO, b"ok")
    bad = bytearray(fp.encode_frame(FrameType.HELLO, b"no"))
    bad[-1] ^= 1
    r = fp.FrameReader(BIG)
    r.feed(good + bad)
    assert r.next_frame() == FrameType.HELLO
    assert r.body() == b"ok"
    with pytest.raises(ProtocolError):
        r.next_frame()


# --------------------------------------------------------------------------
# BatchEncoder -> decode_batch


def test_batch_encoder_round_trip():
    """Types, ids, timestamps (negative and extreme), keys and payloads survive encode/decode."""
    events = [
        ("play", eid(0), 1_700_000_000_000, b"user-1", b"payload-0"),
        ("search", eid(1), -1, None, b"\x00"),
        ("play", eid(2), -(2**63), b"k" * 65535, b"p" * 1000),
        ("client_log", eid(3), 2**63 - 1, None, b""),
        ("search", b"\x00" * 16, 0, b"\x00", os.urandom(50)),
    ]
    enc = fp.BatchEncoder()
    for typ, ident, ts, key, value in events:
        enc.add(typ.encode(), ident, ts, key, value)
    assert enc.count == len(events)
    assert enc.type_names == [b"play", b"search", b"client_log"]
    size = enc.frame_bytes
    frame = enc.finish(2**64 - 1)
    assert len(frame) == size
    r = reader_on(frame)
    assert r.frame_type == FrameType.EVENT_BATCH
    seq, decoded = protocol.decode_batch(r.body())
    assert seq == 2**64 - 1
    assert [(e.type, e.event_id, e.timestamp_ms, e.key, e.payload) for e in decoded] == events


def test_batch_encoder_empty_key_is_no_key_and_reset():
    """An empty key is sent as 'no key'; finish() resets the encoder for the next batch."""
    enc = fp.BatchEncoder()
    enc.add(b"t", eid(0), 5, b"", b"v")
    _, (ev,) = protocol.decode_batch(reader_on(enc.finish(1)).body())
    assert ev.key is None
    assert enc.count == 0 and enc.type_names == []
    assert enc.frame_bytes == protocol.FRAME_HEADER_BYTES + 14  # seq, type count, event count
    enc.add(b"u", eid(1), 6, None, b"w")
    seq, (ev2,) = protocol.decode_batch(reader_on(enc.finish(2)).body())
    assert (seq, ev2.type, ev2.payload) == (2, "u", b"w")


def test_batch_encoder_type_table():
    """Type indices follow first appearance; names must be 1..255 bytes."""
    enc = fp.BatchEncoder()
    assert enc.type_index(b"a") == 0
    assert enc.add(b"b", eid(0), 0, None, b"x") == 1
    assert enc.add(b"a", eid(1), 0, None, b"x") == 0
    assert enc.type_index(b"n" * 255) == 2
    for bad in (b"", b"n" * 256):
        with pytest.raises(ValueError):
            enc.type_index(bad)
        with pytest.raises(ValueError):
            enc.add(bad, eid(2), 0, None, b"x")
    assert enc.type_names == [b"a", b"b", b"n" * 255]


def test_batch_encoder_rejects_bad_events():
    """A non-16-byte id or a key over 65535 bytes is refused and adds nothing."""
    enc = fp.BatchEncoder()
    with pytest.raises(ValueError):
        enc.add(b"t", b"\x01" * 15, 0, None, b"x")
    with pytest.raises(ValueError):
        enc.add(b"t", eid(0), 0, b"k" * 65536, b"x")
    assert enc.count == 0
    _, events = protocol.decode_batch(reader_on(enc.finish(1)).body())
    assert events == []


def test_event_header_size_matches_protocol_constant():
    """Each event costs EVENT_HEADER_BYTES plus its key and payload on the wire."""
    enc = fp.BatchEncoder()
    enc.type_index(b"t")
    before = enc.frame_bytes
    enc.add(b"t", eid(0), 0, b"kk", b"vvv")
    assert enc.frame_bytes - before == protocol.EVENT_HEADER_BYTES + 5


@pytest.mark.parametrize(
    "body",
    [
        raw_body([b"t"], [raw_event(1, b"x")]),  # type index out of range
        raw_body([b"t"], [raw_event(0, b"x")]) + b"\x00",  # trailing bytes
        raw_body([b"t"], [raw_event(0, b"x", vlen=2)]),  # payload runs past the body
        raw_body([b"t"], [raw_event(0, b"x")], count=2),  # fewer events than counted
        raw_body([b"t"], [])[:-1],  # no room for the event count
    ],
)
def test_decode_batch_rejects_malformed(body):
    """The reference decoder raises MALFORMED_FRAME on broken batch bodies."""
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_batch(body)
    assert ei.value.code == ErrorCode.MALFORMED_FRAME


# --------------------------------------------------------------------------
# Router.ingest


def _results_by_name(results, names):
    """Results with the ring replaced by its name, sorted (order within a part is free)."""
    out = []
    for ti, status, reason, count, indices, ring, _details in results:
        assert (ring is not None) == (status == fp.STATUS_ACCEPTED)
        out.append((names[ti], status, reason, count, indices, ring.name if ring is not None else None))
    return sorted(out, key=lambda r: (r[0], r[1], r[2]))


def test_ingest_mixed_batch():
    """Each part of a mixed batch gets the right status, reason, count and indices."""
    known = make_ring("known", max_event_bytes=1000)
    off = make_ring("off", enabled=False)
    small = make_ring("small", max_event_bytes=50)
    tiny = make_ring("tiny", capacity_bytes=100)
    router = make_router(known, off, small, tiny, max_event_bytes=500)
    ingest_events(router, [("tiny", eid(99), 1, None, b"x")], now_ms=1)  # not empty: no room left
    tiny_used = tiny.used_bytes
    zero_id = b"\x00" * 16
    events = [
        ("known", eid(0), 10, b"k0", b"ok-0"),  # 0 accepted
        ("ghost", eid(1), 11, None, b"x"),  # 1 unknown type
        ("off", eid(2), 12, None, b"x"),  # 2 disabled
        ("small", eid(3), 13, b"kkkkk", b"s" * 40),  # 3 accepted: 45 <= 50
        ("small", eid(4), 14, None, b"s" * 51),  # 4 too large for the ring
        ("known", eid(5), 15, None, b""),  # 5 invalid: empty payload
        ("known", zero_id, 16, None, b"x"),  # 6 invalid: all-zero id
        ("tiny", eid(7), 17, None, b"t" * 100),  # 7 no room in the ring
        ("known", eid(8), 18, None, b"b" * 501),  # 8 over the server-wide limit
        ("small", eid(9), 19, b"k" * 30, b"s" * 30),  # 9 too large: key counts
        ("known", eid(10), 20, None, b"ok-10"),  # 10 accepted
        ("off", eid(11), 21, None, b""),  # 11 disabled (the invalid payload does not matter)
        ("small", eid(12), 22, None, b"s" * 50),  # 12 accepted: exactly the limit
        ("ghost", eid(13), 23, None, b"x"),  # 13 unknown type
    ]
    seq, names, results = ingest_events(router, events, now_ms=999, seq=77)
    assert seq == 77
    assert names == [b"known", b"ghost", b"off", b"small", b"tiny"]
    assert _results_by_name(results, names) == sorted(
        [
            (b"known", fp.STATUS_ACCEPTED, fp.REASON_NONE, 2, None, "known"),
            (b"known", fp.STATUS_REJECTED, fp.REASON_INVALID, 2, [5, 6], None),
            (b"known", fp.STATUS_REJECTED, fp.REASON_TOO_LARGE, 1, [8], None),
            (b"ghost", fp.STATUS_REJECTED, fp.REASON_UNKNOWN_TYPE, 2, None, None),
            (b"off", fp.STATUS_REJECTED, fp.REASON_DISABLED, 2, None, None),
            (b"small", fp.STATUS_ACCEPTED, fp.REASON_NONE, 2, None, "small"),
            (b"small", fp.STATUS_REJECTED, fp.REASON_TOO_LARGE, 2, [4, 9], None),
            (b"tiny", fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED, 1, None, None),
        ],
        key=lambda r: (r[0], r[1], r[2]),
    )
    assert router.batches_in == 2
    assert_ring_empty(off)
    assert tiny.used_bytes == tiny_used and tiny.pending_events == 1
    for ring, want in ((known, [events[0], events[10]]), (small, [events[3], events[12]])):
        assert ring.pending_events == ring.events_in == len(want)
        assert ring.used_bytes == ring.pending_bytes > 0
        unit = ring.build_unit(BIG, 1, 0)
        (records,) = parse_batches(unit[0], 1).values()
        assert [(r.key, r.value) for r in records] == [(e[3], e[4]) for e in want]


def test_ingest_capacity_boundary():
    """A part that needs exactly the free bytes fits; one byte less means RETRY_LATER."""
    first = [("t", eid(100), 0, None, b"first")]
    events = [("t", eid(i), i, b"key", b"v" * (i * 7 + 1)) for i in range(5)]
    probe = make_ring("t")
    ingest_events(make_router(probe), first, now_ms=1)
    held = probe.used_bytes
    ingest_events(make_router(probe), events, now_ms=1)
    need = probe.used_bytes - held
    exact = make_ring("t", capacity_bytes=held + need)
    router = make_router(exact)
    ingest_events(router, first, now_ms=1)
    _, _, results = ingest_events(router, events, now_ms=1)
    assert [r[1:4] for r in results] == [(fp.STATUS_ACCEPTED, fp.REASON_NONE, 5)]
    assert exact.used_bytes == held + need and exact.free_bytes == 0
    short = make_ring("t", capacity_bytes=held + need - 1)
    router = make_router(short)
    ingest_events(router, first, now_ms=1)
    _, _, results = ingest_events(router, events, now_ms=1)
    assert [r[1:4] for r in results] == [(fp.STATUS_RETRY_LATER, fp.REASON_OVERLOADED, 5)]
    assert short.used_bytes == held and short.pending_events == 1


def test_ingest_counts_bytes_already_in_the_ring():
    """Free space is capacity minus what earlier batches still hold."""
    events = [("t", eid(i), i, None, b"v" * 100) for i in range(3)]
    probe = make_ring("t")
    ingest_events(make_router(probe), events, now_ms=1)
    ring = make_ring("t", capacity_bytes=2 * probe.used_bytes - 1)
    router = make_router(ring)
    assert ingest_events(router, events, now_ms=1)[2][0][1] == fp.STATUS_ACCEPTED
    assert ingest_events(router, events, now_ms=1)[2][0][1] == fp.STATUS_RETRY_LATER
    assert ring.pending_events == 3


def test_duplicate_type_names_are_malformed():
    """A batch listing one type name twice is refused whole: it could otherwise
    check two parts against the same free space and overfill the ring."""
    ring = make_ring("t")
    router = make_router(ring)
    body = raw_body([b"t", b"t"], [raw_event(0, b"v" * 200, event_id=eid(1)),
                                   raw_event(1, b"v" * 200, event_id=eid(2))])
    with pytest.raises(ProtocolError) as ei:
        router.ingest(reader_on(fp.encode_frame(FrameType.EVENT_BATCH, body)), 1)
    assert ei.value.code == fp.ERR_MALFORMED_FRAME
    assert_ring_empty(ring)


def test_empty_ring_takes_a_part_larger_than_its_capacity():
    """Progress is guaranteed: an empty ring accepts one part even when the
    part needs more than capacity_bytes; the next part waits (retry-later)."""
    ring = make_ring("t", capacity_bytes=64 * 1024)
    router = make_router(ring)
    events = [("t", eid(i), i, None, b"v" * 1000) for i in range(100)]  # ~110 KB in the ring
    assert ingest_events(router, events, now_ms=1)[2][0][1] == fp.STATUS_ACCEPTED
    assert ring.used_bytes > ring.capacity_bytes
    assert ingest_events(router, events, now_ms=1)[2][0][1] == fp.STATUS_RETRY_LATER


def test_negative_timestamp_is_invalid():
    ring = make_ring("t")
    router = make_router(ring)
    _, _, results = ingest_events(router, [("t", eid(1), -5, None, b"x"), ("t", eid(2), 5, None, b"y")], now_ms=1)
    by_status = {r[1]: r for r in results}
    assert by_status[fp.STATUS_REJECTED][2] == fp.REASON_INVALID
    assert by_status[fp.STATUS_REJECTED][4] == [0]
    assert by_status[fp.STATUS_ACCEPTED][3] == 1


def test_too_many_types_in_one_batch_is_malformed():
    ring = make_ring("t")
    router = make_router(ring)
    names = [b"n%d" % i for i in range(4097)]
    body = raw_body(names, [raw_event(0, b"x", event_id=eid(1))])
    with pytest.raises(ProtocolError):
        router.ingest(reader_on(fp.encode_frame(FrameType.EVENT_BATCH, body)), 1)


def test_ingest_empty_batch_with_types():
    """A well-formed batch with no events returns no results and writes nothing."""
    ring = make_ring("t")
    router = make_router(ring)
    frame = fp.encode_frame(FrameType.EVENT_BATCH, raw_body([b"t"], [], seq=9))
    assert router.ingest(reader_on(frame), 1) == (9, [b"t"], [])
    assert_ring_empty(ring)


OK = raw_event(0, b"fine", event_id=eid(0))
OK2 = raw_event(0, b"also fine", event_id=eid(1))

MALFORMED_BATCHES = {
    "type_index_out_of_range": (raw_body([b"t"], [OK, OK2, raw_event(1, b"x")]), fp.ERR_MALFORMED_FRAME),
    "trailing_bytes": (raw_body([b"t"], [OK, OK2]) + b"\x00", fp.ERR_MALFORMED_FRAME),
    "event_runs_past_frame": (raw_body([b"t"], [OK, raw_event(0, b"x", vlen=2)]), fp.ERR_MALFORMED_FRAME),
    "key_runs_past_frame": (raw_body([b"t"], [OK, raw_event(0, b"", klen=5)]), fp.ERR_MALFORMED_FRAME),
    "event_header_cut_short": (raw_body([b"t"], [OK, OK2[:20]]), fp.ERR_MALFORMED_FRAME),
    "fewer_events_than_counted": (raw_body([b"t"], [OK, OK2], count=3), fp.ERR_MALFORMED_FRAME),
    "too_many_events": (raw_body([b"t"], [OK, OK2, OK, OK2]), fp.ERR_TOO_MANY_EVENTS),
    "too_many_events_counted": (raw_body([b"t"], [OK], count=2**32 - 1), fp.ERR_TOO_MANY_EVENTS),
    "empty_type_table": (raw_body([], []), fp.ERR_MALFORMED_FRAME),
    "empty_type_name": (raw_body([b"t", b""], [OK]), fp.ERR_MALFORMED_FRAME),
    "type_table_runs_past_frame": (struct.pack(">QH", 1, 2) + b"\x01t\x05ab", fp.ERR_MALFORMED_FRAME),
    "no_event_count": (struct.pack(">QH", 1, 1) + b"\x01t\x00\x00", fp.ERR_MALFORMED_FRAME),
    "shorter_than_header": (b"\x00" * 9, fp.ERR_MALFORMED_FRAME),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BATCHES))
def test_ingest_malformed_batch_writes_nothing(case):
    """A malformed batch raises ProtocolError with its code and leaves every ring untouched."""
    body, code = MALFORMED_BATCHES[case]
    ring = make_ring("t")
    other = make_ring("u")
    router = make_router(ring, other, max_events_per_batch=3)
    with pytest.raises(ProtocolError) as ei:
        router.ingest(reader_on(fp.encode_frame(FrameType.EVENT_BATCH, body)), 1)
    assert ei.value.code == code
    assert router.batches_in == 0
    assert_ring_empty(ring)
    assert_ring_empty(other)


def test_ingest_at_max_events_per_batch_is_fine():
    """Exactly max_events_per_batch events are accepted (the limit is inclusive)."""
    ring = make_ring("t")
    router = make_router(ring, max_events_per_batch=3)
    body = raw_body([b"t"], [OK, OK2, OK])
    _, _, results = router.ingest(reader_on(fp.encode_frame(FrameType.EVENT_BATCH, body)), 1)
    assert [r[1:4] for r in results] == [(fp.STATUS_ACCEPTED, fp.REASON_NONE, 3)]
    assert ring.pending_events == 3


def test_ingest_needs_an_event_batch_frame():
    """ingest refuses a reader that is not positioned on an EVENT_BATCH frame."""
    router = make_router(make_ring("t"))
    with pytest.raises(ValueError):
        router.ingest(fp.FrameReader(BIG), 1)
    with pytest.raises(ValueError):
        router.ingest(reader_on(fp.encode_frame(FrameType.HEARTBEAT, b"\x00" * 8)), 1)


def test_router_registry():
    """add/get/remove/rings manage rings by name."""
    a, b = make_ring("a"), make_ring("b")
    router = make_router(a, b)
    assert router.get("a") is a and router.get("b") is b and router.get("c") is None
    router.remove("a")
    assert router.get("a") is None
    assert router.rings() == [b]


# --------------------------------------------------------------------------
# TypeRing.build_unit / skip_unit / release


def test_type_ring_name_checks():
    """Ring names must be 1..255 UTF-8 bytes."""
    ring = make_ring("ünï", capacity_bytes=1000)
    assert ring.name == "ünï" and ring.name_bytes == "ünï".encode()
    assert ring.free_bytes == 1000
    for bad in ("", "x" * 256):
        with pytest.raises(ValueError):
            make_ring(bad)


def test_build_unit_records_match_events():
    """One unit holds every waiting event as a Kafka record with our headers."""
    ring = make_ring("play")
    router = make_router(ring)
    events = [
        ("play", eid(0), 5000, b"user-1", b"first"),
        ("play", eid(1), 4000, None, b"earlier than the first"),
        ("play", eid(2), 0, b"k", b"epoch timestamp"),
        ("play", eid(3), 2**40, None, os.urandom(300)),
        ("play", eid(4), 5000, b"u" * 300, b"x"),
    ]
    ingest_events(router, events, now_ms=1_234_567)
    pending_bytes = ring.pending_bytes
    batches, n_events, n_bytes, _, _ = ring.build_unit(BIG, 1, 0)
    assert (n_events, n_bytes) == (5, pending_bytes)
    assert ring.pending_events == ring.pending_bytes == 0
    assert ring.used_bytes == n_bytes  # still counted until released
    assert ring.build_unit(BIG, 1, 0) is None
    (records,) = parse_batches(batches, 1).values()
    for rec, (typ, ident, ts, key, value) in zip(records, events, strict=True):
        assert rec.key == key
        assert rec.value == value
        assert rec.timestamp == ts
        assert rec.headers == expected_headers(typ, ident, ts, 1_234_567)
    assert batches[0][0] == 0


@pytest.mark.parametrize("by_key", [True, False])
def test_build_unit_partitions(by_key):
    """Keyed events of a by_key ring go to murmur2 partitions; everything else to the sticky one."""
    n_parts, sticky = 5, 3
    ring = make_ring("t", by_key=by_key)
    router = make_router(ring)
    events = [
        ("t", eid(i), i, (f"user-{i % 7}".encode() if i % 3 else None), f"v{i}".encode()) for i in range(60)
    ]
    ingest_events(router, events, now_ms=1)
    batches, *_ = ring.build_unit(BIG, n_parts, sticky)
    got = {p: [r.value for r in recs] for p, recs in parse_batches(batches, n_parts).items()}
    want: dict[int, list] = {}
    for _, _, _, key, value in events:
        if by_key and key is not None:
            p = (fp.murmur2(key) & 0x7FFFFFFF) % n_parts
            assert p == (aiokafka_murmur2(key) & 0x7FFFFFFF) % n_parts
        else:
            p = sticky
        want.setdefault(p, []).append(value)
    assert got == want
    if by_key:
        assert len(got) > 1  # the keys really spread over several partitions


def test_build_unit_argument_checks():
    """Bad partition arguments raise ValueError and take nothing."""
    ring = make_ring("t")
    ingest_events(make_router(ring), [("t", eid(0), 0, None, b"x")], now_ms=1)
    for n_parts, sticky in ((0, 0), (2, 2), (2, -1)):
        with pytest.raises(ValueError):
            ring.build_unit(BIG, n_parts, sticky)
    assert ring.pending_events == 1


def test_build_unit_max_bytes_splits_into_units():
    """max_bytes splits the ring into several units, in order, each within the limit."""
    ring = make_ring("t")
    events = [("t", eid(i), i, None, b"v" * 100) for i in range(50)]
    ingest_events(make_router(ring), events, now_ms=1)
    total = ring.used_bytes
    values, released, n_units = [], 0, 0
    while (unit := ring.build_unit(1000, 1, 0)) is not None:
        batches, n_events, n_bytes, end_seq, end_off = unit
        ((_, buf, count),) = batches
        assert count == n_events
        assert len(buf) - KAFKA_BATCH_HEADER_BYTES <= 1000
        values += [r.value for r in parse_batches(batches, 1)[0]]
        ring.release(n_bytes, end_seq, end_off)
        released += n_bytes
        n_units += 1
    assert n_units > 1
    assert values == [e[4] for e in events]
    assert released == total
    assert ring.used_bytes == 0


def test_build_unit_always_takes_one_event():
    """A max_bytes below one record still makes progress, one event per unit."""
    ring = make_ring("t")
    ingest_events(make_router(ring), [("t", eid(i), i, None, b"v" * 100) for i in range(3)], now_ms=1)
    for _ in range(3):
        assert ring.build_unit(1, 1, 0)[1] == 1
    assert ring.build_unit(1, 1, 0) is None


def _fill_many(ring: fp.TypeRing, n: int, now_ms: int) -> list[bytes]:
    router = make_router(ring, max_events_per_batch=5000)
    ids = [eid(i) for i in range(n)]
    for start in range(0, n, 5000):
        ingest_events(
            router,
            [
                ("bulk", ids[i], i, None, ids[i] * 12 + b"tail1234")
                for i in range(start, min(n, start + 5000))
            ],
            now_ms=now_ms,
            seq=start,
        )
    return ids


@pytest.mark.parametrize("release_as_you_go", [True, False])
def test_many_events_across_chunks_exactly_once(release_as_you_go):
    """20,000 200-byte events spanning many 256 KiB chunks come out once each, in order."""
    ring = make_ring("bulk", capacity_bytes=1 << 26)
    ids = _fill_many(ring, 20_000, now_ms=42)
    assert ring.used_bytes > 10 * 262144  # really several chunks
    seen, units = [], []
    while (unit := ring.build_unit(1 << 20, 1, 0)) is not None:
        for rec in parse_batches(unit[0], 1)[0]:
            headers = dict(rec.headers)
            assert rec.value == headers["eb.id"] * 12 + b"tail1234"
            assert len(rec.value) == 200
            assert headers["eb.recv_ts"] == struct.pack(">q", 42)
            seen.append(headers["eb.id"])
        if release_as_you_go:
            ring.release(*unit[2:])
        else:
            units.append(unit)
    for unit in units:
        ring.release(*unit[2:])
    assert len(units) > 1 or release_as_you_go
    assert seen == ids
    assert ring.used_bytes == ring.pending_bytes == ring.pending_events == 0
    # The ring is usable again after being drained.
    ingest_events(make_router(ring), [("bulk", eid(0), 0, None, b"again")], now_ms=1)
    assert [r.value for r in parse_batches(ring.build_unit(BIG, 1, 0)[0], 1)[0]] == [b"again"]


@pytest.mark.parametrize("take", ["build", "skip"])
def test_unit_ending_at_chunk_boundary_then_release(take):
    """A unit that ends exactly at the end of a chunk, released before the next unit is
    taken, leaves the ring consistent (regression: build_unit used to leave its read
    position behind end_seq, and the next build_unit read outside the chunk list)."""
    hit_boundary = False
    for max_bytes in range(200, 2000, 20):
        ring = make_ring("t", chunk_bytes=1000)
        events = [("t", eid(i), i, None, bytes([i]) * 200) for i in range(9)]
        ingest_events(make_router(ring), events, now_ms=1)
        got, total = [], ring.used_bytes
        while True:
            if take == "build":
                unit = ring.build_unit(max_bytes, 1, 0)
                if unit is None:
                    break
                got += [r.value for r in parse_batches(unit[0], 1)[0]]
                n_events, n_bytes, end_seq, end_off = unit[1:]
            else:
                unit = ring.skip_unit(max_bytes)
                if unit is None:
                    break
                n_events, n_bytes, end_seq, end_off = unit
                got += [None] * n_events
            hit_boundary |= end_off == 0 and end_seq > 0
            total -= n_bytes
            ring.release(n_bytes, end_seq, end_off)
            assert ring.used_bytes == total
        assert len(got) == 9
        if take == "build":
            assert got == [e[4] for e in events]
        assert ring.used_bytes == 0
    assert hit_boundary  # the scenario under test really happened


def test_skip_unit_counts():
    """skip_unit takes runs of entries by byte budget without building batches."""
    ring = make_ring("t")
    ingest_events(make_router(ring), [("t", eid(i), i, None, b"v" * 100) for i in range(30)], now_ms=1)
    total = ring.used_bytes
    per_event = total // 30
    assert per_event * 30 == total
    runs = []
    while (r := ring.skip_unit(per_event * 7)) is not None:
        n_events, n_bytes, end_seq, end_off = r
        assert n_bytes == n_events * per_event
        runs.append(n_events)
        ring.release(n_bytes, end_seq, end_off)
    assert runs == [7, 7, 7, 7, 2]
    assert ring.used_bytes == ring.pending_events == 0
    assert ring.skip_unit(BIG) is None


# --------------------------------------------------------------------------
# control frames (protocol.py)


def _through_reader(frame: bytes, expected_type: int) -> bytes:
    r = reader_on(frame)
    assert r.frame_type == expected_type
    return r.body()


@pytest.mark.parametrize("hello", [Hello("svc-α"), Hello("x" * 255, auth=b"\x00token\xff"), Hello("")])
def test_hello_round_trip(hello):
    """HELLO survives encode -> FrameReader -> decode."""
    assert Hello.decode(_through_reader(hello.encode(), FrameType.HELLO)) == hello


def test_hello_rejects_bad_magic_version_and_id():
    """Bad magic -> BAD_HANDSHAKE, version 2 -> UNSUPPORTED_VERSION, and other broken bodies."""
    body = _through_reader(Hello("c").encode(), FrameType.HELLO)
    cases = [
        (b"EVBX" + body[4:], ErrorCode.BAD_HANDSHAKE),
        (_through_reader(Hello("c", version=2).encode(), FrameType.HELLO), ErrorCode.UNSUPPORTED_VERSION),
        (struct.pack(">4sHHH", b"EVBK", 1, 0, 2) + b"\xff\xfe" + b"\x00\x00", ErrorCode.BAD_HANDSHAKE),
        (struct.pack(">4sHHH", b"EVBK", 1, 0, 256) + b"x" * 256 + b"\x00\x00", ErrorCode.BAD_HANDSHAKE),
        (body[:-1], ErrorCode.MALFORMED_FRAME),
        (body + b"\x00", ErrorCode.MALFORMED_FRAME),
    ]
    for bad, code in cases:
        with pytest.raises(ProtocolError) as ei:
            Hello.decode(bad)
        assert ei.value.code == code, bad


def test_hello_refuses_long_client_id():
    with pytest.raises(ValueError):
        Hello("x" * 256).encode()


def test_welcome_round_trip():
    """WELCOME carries the server's limits and id."""
    w = Welcome(
        max_frame_bytes=8 << 20,
        max_event_bytes=1 << 20,
        max_events_per_batch=10_000,
        heartbeat_interval_ms=5000,
        server_id="gw-1 ☃",
    )
    assert Welcome.decode(_through_reader(w.encode(), FrameType.WELCOME)) == w


@pytest.mark.parametrize(
    "entries",
    [
        (),
        (AckEntry(0, Status.PERSISTED, Reason.NONE, 5),),
        (
            AckEntry(0, Status.PERSISTED, Reason.NONE, 5),
            AckEntry(1, Status.REJECTED, Reason.TOO_LARGE, 2, indices=(3, 2**32 - 1)),
            AckEntry(2, Status.RETRY_LATER, Reason.OVERLOADED, 4, retry_after_ms=250),
            AckEntry(65535, Status.REJECTED, Reason.INVALID, 1, indices=(0,)),
        ),
    ],
)
def test_ack_round_trip(entries):
    """ACK entries, with and without indices, survive encode -> decode."""
    ack = Ack(batch_seq=2**64 - 1, entries=entries)
    assert Ack.decode(_through_reader(ack.encode(), FrameType.ACK)) == ack


def test_ack_rejects_truncated_indices():
    body = _through_reader(Ack(1, (AckEntry(0, 1, 2, 2, indices=(1, 2)),)).encode(), FrameType.ACK)
    with pytest.raises(ProtocolError) as ei:
        Ack.decode(body[:-1])
    assert ei.value.code == ErrorCode.MALFORMED_FRAME


def test_goaway_error_and_heartbeat_round_trip():
    """GOAWAY, ERROR and HEARTBEAT survive encode -> decode."""
    g = Goaway(GoawayReason.REBALANCE, 1500, "moving to gw-2")
    assert Goaway.decode(_through_reader(g.encode(), FrameType.GOAWAY)) == g
    e = ErrorFrame(ErrorCode.TOO_MANY_EVENTS, "batch of 10001 events")
    assert ErrorFrame.decode(_through_reader(e.encode(), FrameType.ERROR)) == e
    for token in (0, 1, 2**64 - 1):
        assert (
            protocol.decode_heartbeat(_through_reader(protocol.encode_heartbeat(token), FrameType.HEARTBEAT))
            == token
        )
    with pytest.raises(ProtocolError):
        protocol.decode_heartbeat(b"\x00" * 9)


def test_error_frame_message_is_capped():
    """ERROR messages are cut to 4096 bytes."""
    e = ErrorFrame(ErrorCode.INTERNAL, "m" * 5000)
    assert ErrorFrame.decode(_through_reader(e.encode(), FrameType.ERROR)).message == "m" * 4096


# --------------------------------------------------------------------------
# constants


@pytest.mark.parametrize(
    "enum_cls, prefix",
    [(FrameType, "FRAME_"), (ErrorCode, "ERR_"), (Status, "STATUS_"), (Reason, "REASON_"),
     (GoawayReason, "GOAWAY_")],
)
def test_protocol_enums_cover_every_native_code(enum_cls, prefix):
    """The codes are defined once (_native/consts.pxi); protocol.py's enums
    name every one of them and nothing else."""
    native = {n[len(prefix) :]: getattr(fp, n) for n in dir(fp) if n.startswith(prefix)}
    native.pop("ACCEPTED", None)  # internal to BatchSplitter.ingest, never on the wire
    native.pop("HEADER_BYTES", None)  # FRAME_HEADER_BYTES: a size, not a frame type
    assert {m.name: m.value for m in enum_cls} == native
    assert len(enum_cls.__members__) == len(list(enum_cls)), "no two names share a value"


def test_accepted_status_is_not_a_wire_status():
    assert fp.STATUS_ACCEPTED not in {s.value for s in Status}
    assert sorted(t.value for t in FrameType) == list(range(1, 8))


# --------------------------------------------------------------------------
# entries taken out for the disk spool and appended back


def test_take_entries_round_trips_into_identical_batches():
    """Entries taken from one ring and appended to another build the same batches,
    across chunk boundaries, for keyed and unkeyed events."""
    src = make_ring("play", chunk_bytes=4096)
    router = make_router(src)
    events = [("play", os.urandom(16), 1_700_000_000_000 + i, (b"k%d" % (i % 7)) if i % 3 else None,
               os.urandom(50 + i % 200)) for i in range(300)]
    ingest_events(router, events, now_ms=1_700_000_000_500)
    taken = []
    while (r := src.take_entries(8000)) is not None:
        entries, n_events, n_bytes, end_seq, end_off = r
        assert len(entries) == n_bytes
        taken.append(r)
    assert sum(t[1] for t in taken) == 300
    assert src.pending_events == 0 and src.used_bytes > 0  # still held until released
    for _, _, n_bytes, end_seq, end_off in taken:
        src.release(n_bytes, end_seq, end_off)
    assert src.used_bytes == 0
    dst = make_ring("play")
    for entries, n_events, *_ in taken:
        assert dst.append_entries(entries) == n_events
    assert dst.pending_events == 300
    unit = dst.build_unit(BIG, 3, 1)
    records = parse_batches(unit[0], 3)
    got = sorted((r.headers[0][1], r.key, r.value, r.timestamp) for recs in records.values() for r in recs)
    want = sorted((ident, key, value, ts) for _, ident, ts, key, value in events)
    assert got == want
    for p, recs in records.items():  # keyed events went to murmur2(key) % 3
        for r in recs:
            if r.key is not None:
                assert (fp.murmur2(r.key) & 0x7FFFFFFF) % 3 == p


@pytest.mark.parametrize("cut", [1, 23, 24, 25, -1])
def test_append_entries_refuses_a_buffer_that_does_not_parse(cut):
    """A truncated or overlong buffer raises ValueError and appends nothing."""
    src = make_ring("play")
    ingest_events(make_router(src), [("play", b"i" * 16, 1, b"key", b"value" * 10)] * 3, now_ms=2)
    entries = src.take_entries(BIG)[0]
    bad = entries[:cut] if cut > 0 else entries + b"\x00" * 30
    dst = make_ring("play")
    with pytest.raises(ValueError):
        dst.append_entries(bad)
    assert dst.pending_events == 0 and dst.used_bytes == 0
    lying = b"\xff\xff\xff\xff" + entries[4:]
    with pytest.raises(ValueError):
        dst.append_entries(lying)
    assert dst.append_entries(b"") == 0


def test_a_name_no_gateway_could_have_is_invalid_type_name():
    """Unknown but valid names are unknown_type; names outside the config's
    pattern (upper case, spaces, too long) are invalid_type_name."""
    router = make_router(make_ring("play"))
    events = [("Play", eid(1), 1, None, b"x"), ("nosuch", eid(2), 1, None, b"x"), ("a b", eid(3), 1, None, b"x"),
              ("x" * 65, eid(4), 1, None, b"x"), ("play", eid(5), 1, None, b"x")]
    _, names, results = ingest_events(router, events, now_ms=1)
    by_name = {names[ti]: (status, reason) for ti, status, reason, *_ in results}
    assert by_name == {b"Play": (fp.STATUS_REJECTED, fp.REASON_INVALID_TYPE_NAME),
                       b"nosuch": (fp.STATUS_REJECTED, fp.REASON_UNKNOWN_TYPE),
                       b"a b": (fp.STATUS_REJECTED, fp.REASON_INVALID_TYPE_NAME),
                       b"x" * 65: (fp.STATUS_REJECTED, fp.REASON_INVALID_TYPE_NAME),
                       b"play": (fp.STATUS_ACCEPTED, fp.REASON_NONE)}


def test_parts_of_unknown_types_are_answered_natively():
    """ingest_answering encodes the ACK entries of types no ring has (however
    many) and keeps only configured types' parts as Python results."""
    play = make_ring("play")
    router = make_router(play)
    events = [("play", eid(1), 1, None, b"x")] + [(f"u{i:04d}", eid(i + 2), 1, None, b"y") for i in range(4000)] \
        + [("Bad Name", eid(9999), 1, None, b"z")]
    enc = fp.BatchEncoder()
    for typ, ident, ts, key, value in events:
        enc.add(typ.encode(), ident, ts, key, value)
    seq, names, results, encoded, n, unknown, invalid = router.ingest_answering(reader_on(enc.finish(5)), 1)
    assert [(r[0], r[1]) for r in results] == [(0, fp.STATUS_ACCEPTED)]
    assert (n, unknown, invalid, len(encoded)) == (4001, 4000, 1, 4001 * 16)
    ack = Ack.decode(encode_ack_body(seq, [], encoded, n))
    assert {(names[e.type_index], e.status, e.reason, e.count) for e in ack.entries} == (
        {(f"u{i:04d}".encode(), fp.STATUS_REJECTED, fp.REASON_UNKNOWN_TYPE, 1) for i in range(4000)}
        | {(b"Bad Name", fp.STATUS_REJECTED, fp.REASON_INVALID_TYPE_NAME, 1)})
