"""Property tests (hypothesis) for the framer, the batch decoder and the
splitter in ``eventbroker._fastpath``.

The native code is checked against small, slow reference models written here
from the wire format in ``_fastpath``'s module docstring: a frame parser, a
batch parser and the per-event accept/reject rules of ``Router.ingest``.
Kafka record batches are parsed with aiokafka's own reader.
"""

from __future__ import annotations

import os
import struct
from collections import deque

from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from eventbroker import _fastpath as fp
from eventbroker import protocol
from eventbroker.errors import ProtocolError

# CI runs a short version; a long fuzzing run is opt-in, e.g.
#   EVENTBROKER_FUZZ_EXAMPLES=200000 pytest tests/test_properties.py
# (200,000 examples per test, over a million inputs across the file).
EXAMPLES = int(os.environ.get("EVENTBROKER_FUZZ_EXAMPLES", "250"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_FRAME = 1024
ZERO_ID = b"\x00" * 16
BIG = 1 << 24

# --------------------------------------------------------------------------
# reference models


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def ref_crc32c(data: bytes) -> int:
    """Plain table-driven CRC-32C, independent of the native one."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_HEAD = struct.Struct(">IBBHI")


def ref_frames(stream: bytes, max_frame: int):
    """Reference frame parser: ``(frames, ("wait", bytes_left))`` or
    ``(frames, ("error", {acceptable codes}))``."""
    pos, frames = 0, []
    while True:
        rest = len(stream) - pos
        if rest < 12:
            return frames, ("wait", rest)
        length, ftype, flags, reserved, crc = _HEAD.unpack_from(stream, pos)
        codes = set()
        if length > max_frame:
            codes.add(fp.ERR_FRAME_TOO_LARGE)
        if not 1 <= ftype <= 7:
            codes.add(fp.ERR_UNKNOWN_FRAME_TYPE)
        if flags or reserved:
            codes.add(fp.ERR_MALFORMED_FRAME)
        if codes:  # all three are visible in the header alone
            return frames, ("error", codes)
        if rest < 12 + length:
            return frames, ("wait", rest)
        body = stream[pos + 12 : pos + 12 + length]
        if ref_crc32c(stream[pos + 4 : pos + 8] + body) != crc:
            return frames, ("error", {fp.ERR_BAD_CHECKSUM})
        frames.append((ftype, body))
        pos += 12 + length


class Malformed(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


_EV = struct.Struct(">HHIq16s")


def ref_parse_batch(body: bytes, max_events: int):
    """Reference EVENT_BATCH parser: ``(seq, names, [(ti, key, payload, ts, id)])``.

    Well formed means: a type table of 1+ non-empty names, at most
    ``max_events`` events, every type index in the table, and no bytes
    missing or left over.
    """
    if len(body) < 10:
        raise Malformed(fp.ERR_MALFORMED_FRAME)
    seq, nt = struct.unpack_from(">QH", body)
    pos = 10
    if nt == 0:
        raise Malformed(fp.ERR_MALFORMED_FRAME)
    names = []
    for _ in range(nt):
        if pos >= len(body) or body[pos] == 0 or pos + 1 + body[pos] > len(body):
            raise Malformed(fp.ERR_MALFORMED_FRAME)
        names.append(body[pos + 1 : pos + 1 + body[pos]])
        pos += 1 + body[pos]
    if len(set(names)) != len(names):  # each name once per batch
        raise Malformed(fp.ERR_MALFORMED_FRAME)
    if pos + 4 > len(body):
        raise Malformed(fp.ERR_MALFORMED_FRAME)
    (ne,) = struct.unpack_from(">I", body, pos)
    pos += 4
    if ne > max_events:
        raise Malformed(fp.ERR_TOO_MANY_EVENTS)
    events = []
    for _ in range(ne):
        if pos + 32 > len(body):
            raise Malformed(fp.ERR_MALFORMED_FRAME)
        ti, klen, vlen, ts, ident = _EV.unpack_from(body, pos)
        if ti >= nt or pos + 32 + klen + vlen > len(body):
            raise Malformed(fp.ERR_MALFORMED_FRAME)
        key = body[pos + 32 : pos + 32 + klen]
        events.append((ti, key, body[pos + 32 + klen : pos + 32 + klen + vlen], ts, ident))
        pos += 32 + klen + vlen
    if pos != len(body):
        raise Malformed(fp.ERR_MALFORMED_FRAME)
    return seq, names, events


def ref_ingest(names, events, rings: dict[bytes, fp.TypeRing], router_max: int):
    """Expected ``Router.ingest`` results (with rings roomy enough) and, per ring
    name, the accepted events in batch order."""
    results, accepted_idx = [], set()
    for ti in range(len(names)):
        idx = [i for i, e in enumerate(events) if e[0] == ti]
        if not idx:
            continue
        ring = rings.get(names[ti])
        if ring is None:
            results.append((ti, fp.STATUS_REJECTED, fp.REASON_UNKNOWN_TYPE, len(idx), None, None))
            continue
        if not ring.enabled:
            results.append((ti, fp.STATUS_REJECTED, fp.REASON_DISABLED, len(idx), None, None))
            continue
        rejected: dict[int, list[int]] = {}
        ok = []
        for i in idx:
            _, key, payload, ts, ident = events[i]
            if not payload or ident == ZERO_ID or ts < 0:
                rejected.setdefault(fp.REASON_INVALID, []).append(i)
            elif len(key) + len(payload) > min(ring.max_event_bytes, router_max):
                rejected.setdefault(fp.REASON_TOO_LARGE, []).append(i)
            else:
                ok.append(i)
        for reason, lst in rejected.items():
            results.append((ti, fp.STATUS_REJECTED, reason, len(lst), lst, None))
        if ok:
            results.append((ti, fp.STATUS_ACCEPTED, fp.REASON_NONE, len(ok), None, names[ti]))
            accepted_idx.update(ok)
    accepted: dict[bytes, list] = {}
    for i, e in enumerate(events):
        if i in accepted_idx:
            accepted.setdefault(names[e[0]], []).append(e)
    return results, accepted


# --------------------------------------------------------------------------
# helpers


def split(stream: bytes, cuts: list[int], kinds: list) -> list:
    """``stream`` cut at ``cuts`` into pieces of assorted buffer types."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [
        kinds[i % len(kinds)](stream[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]


def run_reader(pieces, max_frame: int = MAX_FRAME):
    """Feed ``pieces`` and drain after each; ``(frames, ("wait", n) | ("error", code))``."""
    reader = fp.FrameReader(max_frame)
    frames = []
    try:
        for piece in pieces:
            reader.feed(piece)
            while (t := reader.next_frame()) != -1:
                assert 1 <= t <= 7
                assert reader.body_length <= max_frame
                frames.append((t, reader.body()))
    except ProtocolError as e:
        return frames, ("error", e.code)
    return frames, ("wait", reader.buffered_bytes)


def assert_matches_reference(stream: bytes, pieces, max_frame: int = MAX_FRAME):
    frames, (kind, detail) = run_reader(pieces, max_frame)
    want_frames, (want_kind, want_detail) = ref_frames(stream, max_frame)
    assert frames == want_frames
    assert kind == want_kind
    if kind == "error":
        assert detail in want_detail
    else:
        assert detail == want_detail
    return frames, kind


@st.composite
def chunkings(draw, n: int):
    """Cut points into a stream of ``n`` bytes, and the buffer types to feed."""
    cuts = draw(st.lists(st.integers(0, n), max_size=12))
    kinds = draw(st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=1, max_size=3))
    return cuts, kinds


frames_st = st.lists(st.tuples(st.integers(1, 7), st.binary(max_size=200)), max_size=10)


def encode_all(frames) -> bytes:
    return b"".join(fp.encode_frame(t, b) for t, b in frames)


@st.composite
def junk_streams(draw):
    """Byte streams mixing valid frames, plausible-but-wrong headers and noise."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["frame", "header", "noise"]))
        if kind == "frame":
            parts.append(fp.encode_frame(draw(st.integers(1, 7)), draw(st.binary(max_size=100))))
        elif kind == "header":
            body = draw(st.binary(max_size=60))
            length = draw(
                st.one_of(st.just(len(body)), st.integers(0, 2 * MAX_FRAME), st.integers(0, 2**32 - 1))
            )
            ftype = draw(st.integers(0, 255))
            flags = draw(st.sampled_from([0, 0, 0, 1, 128]))
            reserved = draw(st.sampled_from([0, 0, 0, 1, 0x8000]))
            head = struct.pack(">BBH", ftype, flags, reserved)
            crc = ref_crc32c(head + body) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
            parts.append(struct.pack(">I", length) + head + struct.pack(">I", crc) + body)
        else:
            parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


# Rings for the batch properties: one per behaviour the splitter distinguishes.
def make_rings() -> dict[bytes, fp.TypeRing]:
    rings = [
        fp.TypeRing("a", capacity_bytes=BIG, max_event_bytes=30, by_key=True),
        fp.TypeRing("b", capacity_bytes=BIG, max_event_bytes=1000, by_key=False),
        fp.TypeRing("c", capacity_bytes=BIG, max_event_bytes=1000, enabled=False),
        fp.TypeRing("dd", capacity_bytes=BIG, max_event_bytes=1000, by_key=True, chunk_bytes=512),
    ]
    return {r.name_bytes: r for r in rings}


ROUTER_MAX_EVENT = 50
ROUTER_MAX_EVENTS = 8


def make_router(rings) -> fp.BatchSplitter:
    router = fp.BatchSplitter(max_events_per_batch=ROUTER_MAX_EVENTS, max_event_bytes=ROUTER_MAX_EVENT)
    for ring in rings.values():
        router.add(ring)
    return router


def check_rings_hold(rings, accepted, now_ms: int, n_parts: int, sticky: int, max_bytes: int):
    """Drain every ring into record batches; they must hold exactly ``accepted``."""
    for name, ring in rings.items():
        want: dict[int, list] = {}
        for _, key, payload, ts, ident in accepted.get(name, []):
            if ring.by_key and key:
                p = (fp.murmur2(key) & 0x7FFFFFFF) % n_parts
            else:
                p = sticky
            headers = [
                ("eb.id", ident),
                ("eb.type", name),
                ("eb.ts", struct.pack(">q", ts)),
                ("eb.recv_ts", struct.pack(">q", now_ms)),
            ]
            want.setdefault(p, []).append((key or None, payload, ts, headers))
        got: dict[int, list] = {}
        while (unit := ring.build_unit(max_bytes, n_parts, sticky)) is not None:
            batches, n_events, n_bytes, end_seq, end_off = unit
            assert n_events == sum(count for _, _, count in batches) > 0
            for partition, buf, count in batches:
                batch = DefaultRecordBatch(bytearray(buf))
                assert batch.validate_crc()
                records = list(batch)
                assert len(records) == count
                assert [r.offset for r in records] == list(range(count))
                assert batch.max_timestamp == max(r.timestamp for r in records)
                got.setdefault(partition, []).extend(
                    (r.key, r.value, r.timestamp, [(k, v) for k, v in r.headers]) for r in records
                )
            ring.release(n_bytes, end_seq, end_off)
        assert got == want, name
        assert ring.used_bytes == ring.pending_events == 0


def normalize(results):
    out = []
    for ti, status, reason, count, indices, ring, _details in results:
        out.append((ti, status, reason, count, indices, ring.name_bytes if ring is not None else None))
    return sorted(out, key=lambda r: (r[0], r[1], r[2]))


# --------------------------------------------------------------------------
# properties


def test_reference_crc_is_crc32c():
    """The reference CRC used below is CRC-32C."""
    assert ref_crc32c(b"123456789") == 0xE3069283


@SETTINGS
@given(frames=frames_st, data=st.data())
def test_frames_survive_any_chunking(frames, data):
    """Frames concatenated and fed in any chunking come out exactly, in order."""
    stream = encode_all(frames)
    cuts, kinds = data.draw(chunkings(len(stream)))
    got, outcome = run_reader(split(stream, cuts, kinds), max_frame=BIG)
    assert got == frames
    assert outcome == ("wait", 0)


# Event ids: now and then the invalid all-zero id (sampled_from favours its first element).
ids_st = st.tuples(st.sampled_from([False] * 7 + [True]), st.binary(min_size=16, max_size=16)).map(
    lambda t: ZERO_ID if t[0] else t[1]
)

event_st = st.tuples(
    st.sampled_from(["a", "b", "c", "dd", "zz"]),  # zz has no ring
    ids_st,
    st.integers(-(2**63), 2**63 - 1),
    st.one_of(st.none(), st.binary(max_size=25)),
    st.binary(max_size=60),
)


@SETTINGS
@given(
    events=st.lists(event_st, max_size=ROUTER_MAX_EVENTS),
    seq=st.integers(0, 2**64 - 1),
    now_ms=st.integers(-(2**63), 2**63 - 1),
    n_parts=st.integers(1, 4),
    sticky_pick=st.integers(0, 3),
    max_bytes=st.integers(1, 3000),
    data=st.data(),
)
def test_batches_round_trip(events, seq, now_ms, n_parts, sticky_pick, max_bytes, data):
    """Any batch round-trips through BatchEncoder, FrameReader (any chunking) and
    decode_batch, and Router.ingest puts exactly the acceptable events in the rings."""
    sticky = sticky_pick % n_parts
    enc = fp.BatchEncoder()
    for typ, ident, ts, key, payload in events:
        enc.add(typ.encode(), ident, ts, key, payload)
    names = enc.type_names
    frame = enc.finish(seq)
    rings = make_rings()
    router = make_router(rings)
    cuts, kinds = data.draw(chunkings(len(frame)))
    reader = fp.FrameReader(BIG)
    result = None
    for piece in split(frame, cuts, kinds):
        reader.feed(piece)
        while (t := reader.next_frame()) != -1:
            assert t == fp.FRAME_EVENT_BATCH and result is None
            got_seq, decoded = protocol.decode_batch(reader.body())
            assert got_seq == seq
            assert [(e.type, e.event_id, e.timestamp_ms, e.key, e.payload) for e in decoded] == [
                (typ, ident, ts, key or None, payload) for typ, ident, ts, key, payload in events
            ]
            if not names:
                return  # an empty type table is malformed for the router; covered elsewhere
            result = router.ingest(reader, now_ms)
    assert result is not None
    got_seq, got_names, results = result
    assert (got_seq, got_names) == (seq, names)
    wire_events = [
        (names.index(typ.encode()), key or b"", payload, ts, ident) for typ, ident, ts, key, payload in events
    ]
    want_results, accepted = ref_ingest(names, wire_events, rings, ROUTER_MAX_EVENT)
    assert normalize(results) == sorted(want_results, key=lambda r: (r[0], r[1], r[2]))
    check_rings_hold(rings, accepted, now_ms, n_parts, sticky, max_bytes)


@SETTINGS
@given(stream=st.one_of(st.binary(max_size=600), junk_streams()), data=st.data())
def test_reader_never_crashes_on_arbitrary_bytes(stream, data):
    """Any bytes in any chunking give only checked frames, then an error or a wait,
    exactly as the reference parser says."""
    cuts, kinds = data.draw(chunkings(len(stream)))
    frames, kind = assert_matches_reference(stream, split(stream, cuts, kinds))
    event(f"{kind} after {'some' if frames else 'no'} frames")


@SETTINGS
@given(frames=frames_st, garbage=st.one_of(st.binary(max_size=300), junk_streams()), data=st.data())
def test_valid_frames_then_garbage(frames, garbage, data):
    """After valid frames, garbage never produces a frame: the reader returns exactly
    the frames sent, then raises ProtocolError or waits for more."""
    ref_garbage_frames, _ = ref_frames(garbage, MAX_FRAME)
    assume(not ref_garbage_frames)  # garbage that happens to start with a real frame is not garbage
    stream = encode_all(frames) + garbage
    cuts, kinds = data.draw(chunkings(len(stream)))
    got, _ = assert_matches_reference(stream, split(stream, cuts, kinds))
    assert got == frames


@SETTINGS
@given(
    frames=st.lists(st.tuples(st.integers(1, 7), st.binary(max_size=200)), min_size=1, max_size=8),
    data=st.data(),
)
def test_bit_flip_never_yields_an_unsent_frame(frames, data):
    """Flipping any single bit loses the damaged frame and everything after it,
    but never delivers a frame that was not sent."""
    encoded = [fp.encode_frame(t, b) for t, b in frames]
    stream = bytearray(b"".join(encoded))
    bit = data.draw(st.integers(0, len(stream) * 8 - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    damaged, end = 0, len(encoded[0])
    while end <= bit // 8:
        damaged += 1
        end += len(encoded[damaged])
    cuts, kinds = data.draw(chunkings(len(stream)))
    got, _ = run_reader(split(bytes(stream), cuts, kinds), max_frame=BIG)
    assert got == frames[:damaged]


@SETTINGS
@given(frames=frames_st, data=st.data())
def test_truncation_yields_complete_frames_and_waits(frames, data):
    """A stream cut anywhere yields exactly the frames wholly before the cut, then
    waits with the rest buffered."""
    stream = encode_all(frames)
    cut = data.draw(st.integers(0, len(stream)))
    whole, end = [], 0
    for t, b in frames:
        if end + 12 + len(b) > cut:
            break
        whole.append((t, b))
        end += 12 + len(b)
    cuts, kinds = data.draw(chunkings(cut))
    got, outcome = run_reader(split(stream[:cut], cuts, kinds), max_frame=BIG)
    assert got == whole
    assert outcome == ("wait", cut - end)


step_st = st.one_of(
    st.tuples(st.just("ingest"), st.lists(st.integers(1, 300), min_size=1, max_size=8)),
    st.tuples(st.just("build"), st.integers(1, 3000)),
    st.tuples(st.just("skip"), st.integers(1, 3000)),
    st.tuples(st.just("release"), st.just(0)),
)


@SETTINGS
@given(chunk_bytes=st.integers(64, 2048), steps=st.lists(step_st, max_size=30), n_parts=st.integers(1, 3))
def test_ring_units_take_every_event_once(chunk_bytes, steps, n_parts):
    """Any interleaving of ingest, build_unit, skip_unit and in-order release takes
    every event exactly once, in order, and keeps the byte accounting exact, across
    chunk boundaries (small chunks make units end on them often)."""
    ring = fp.TypeRing("r", capacity_bytes=BIG, max_event_bytes=BIG, chunk_bytes=chunk_bytes, by_key=False)
    router = fp.BatchSplitter(max_events_per_batch=100, max_event_bytes=BIG)
    router.add(ring)
    waiting: deque[tuple] = deque()  # (payload, timestamp) written, not yet taken into a unit
    outstanding: deque[tuple] = deque()  # (n_bytes, end_seq, end_off) of unreleased units
    serial = 0
    for op, arg in [*steps, ("drain", 0)]:
        if op == "ingest":
            enc = fp.BatchEncoder()
            for size in arg:
                serial += 1
                payload = (serial.to_bytes(4, "big") * 75)[:size]
                enc.add(b"r", serial.to_bytes(16, "big"), serial, None, payload)
                waiting.append((payload, serial))
            reader = fp.FrameReader(BIG)
            reader.feed(enc.finish(serial))
            assert reader.next_frame() == fp.FRAME_EVENT_BATCH
            assert router.ingest(reader, 7)[2][0][1] == fp.STATUS_ACCEPTED
        elif op in ("build", "skip", "drain"):
            while True:
                sticky = serial % n_parts
                if op == "skip":
                    unit = ring.skip_unit(arg)
                    taken = None if unit is None else [None] * unit[0]
                else:
                    unit = ring.build_unit(arg if op == "build" else BIG, n_parts, sticky)
                    if unit is not None:
                        ((partition, buf, count),) = unit[0]
                        assert partition == sticky
                        batch = DefaultRecordBatch(bytearray(buf))
                        assert batch.validate_crc()
                        taken = [(r.value, r.timestamp) for r in batch]
                        assert len(taken) == count
                        assert batch.max_timestamp == max(ts for _, ts in taken)
                        unit = unit[1:]
                if unit is None:
                    assert not waiting
                    break
                n_events, n_bytes, end_seq, end_off = unit
                assert n_events == len(taken) > 0
                want = [waiting.popleft() for _ in range(n_events)]
                if taken[0] is not None:
                    assert taken == want
                outstanding.append((n_bytes, end_seq, end_off))
                if op != "drain":
                    break
                ring.release(*outstanding.popleft())
        elif outstanding:
            ring.release(*outstanding.popleft())
        assert ring.pending_events == len(waiting)
        assert ring.used_bytes == ring.pending_bytes + sum(u[0] for u in outstanding)
    while outstanding:
        ring.release(*outstanding.popleft())
    assert ring.used_bytes == ring.pending_bytes == ring.pending_events == 0


@st.composite
def batch_bodies(draw):
    """EVENT_BATCH bodies: mostly well formed, often subtly not, sometimes noise."""

    def rarely(one_in: int) -> bool:
        # True about once in ``one_in`` draws (hypothesis favours the first element).
        return draw(st.sampled_from([False] * (one_in - 1) + [True]))

    if rarely(5):
        return draw(st.binary(max_size=300))
    names = draw(st.lists(st.sampled_from([b"a", b"b", b"c", b"dd", b"zz"]), min_size=1, max_size=4))
    if rarely(20):
        names.append(b"")  # an empty name
    nt = draw(st.integers(0, 6)) if rarely(10) else len(names)
    out = struct.pack(">QH", draw(st.integers(0, 2**64 - 1)), nt)
    out += b"".join(bytes([len(n)]) + n for n in names)
    n_events = draw(st.integers(0, ROUTER_MAX_EVENTS + 1))
    # At most one event lies about its type index, key length or payload length.
    liar = draw(st.integers(0, n_events - 1)) if n_events and rarely(5) else -1
    lie = draw(st.sampled_from(["ti", "klen", "vlen"]))
    events = []
    for i in range(n_events):
        ti = draw(st.integers(0, max(nt, 1) - 1))
        key = draw(st.binary(max_size=25))
        payload = draw(st.binary(max_size=60))
        ident = draw(ids_st)
        klen, vlen = len(key), len(payload)
        if i == liar:
            if lie == "ti":
                ti = draw(st.integers(0, 65535))
            elif lie == "klen":
                klen = draw(st.integers(0, 65535))
            else:
                vlen = draw(st.integers(0, 2**32 - 1))
        events.append(_EV.pack(ti, klen, vlen, draw(st.integers(-(2**63), 2**63 - 1)), ident) + key + payload)
    count = draw(st.integers(0, 2**32 - 1)) if rarely(15) else len(events)
    out += struct.pack(">I", count) + b"".join(events)
    if rarely(15):
        out += draw(st.binary(min_size=1, max_size=4))
    if rarely(15):
        out = out[: draw(st.integers(0, len(out)))]
    return out


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(body=batch_bodies(), now_ms=st.integers(0, 2**62), n_parts=st.integers(1, 3))
def test_ingest_arbitrary_batch_body(body, now_ms, n_parts):
    """Router.ingest on any EVENT_BATCH body either raises ProtocolError (exactly when
    the reference parser calls it malformed, leaving every ring empty) or returns the
    reference results and fills the rings with exactly the accepted events."""
    rings = make_rings()
    router = make_router(rings)
    reader = fp.FrameReader(BIG)
    reader.feed(fp.encode_frame(fp.FRAME_EVENT_BATCH, body))
    assert reader.next_frame() == fp.FRAME_EVENT_BATCH
    try:
        ref = ref_parse_batch(body, ROUTER_MAX_EVENTS)
    except Malformed as m:
        ref, ref_code = None, m.code
    try:
        got = router.ingest(reader, now_ms)
    except ProtocolError as e:
        event(f"refused: code {e.code}")
        assert ref is None, f"ingest refused a well-formed batch: {e}"
        assert e.code == ref_code
        assert router.batches_in == 0
        for ring in rings.values():
            assert ring.used_bytes == ring.pending_events == ring.events_in == 0
            assert ring.build_unit(BIG, 1, 0) is None
        return
    assert ref is not None, "ingest accepted a malformed batch"
    seq, names, events = ref
    assert got[:2] == (seq, names)
    # The plain-Python decoder in protocol.py agrees on a well-formed batch.
    d_seq, decoded = protocol.decode_batch(body)
    assert d_seq == seq
    assert [(e.type, e.key, e.payload, e.timestamp_ms, e.event_id) for e in decoded] == [
        (names[ti].decode("utf-8", "replace"), key or None, payload, ts, ident)
        for ti, key, payload, ts, ident in events
    ]
    want_results, accepted = ref_ingest(names, events, rings, ROUTER_MAX_EVENT)
    event(f"well formed, {'some' if accepted else 'no'} events accepted")
    assert normalize(got[2]) == sorted(want_results, key=lambda r: (r[0], r[1], r[2]))
    assert router.batches_in == 1
    check_rings_hold(rings, accepted, now_ms, n_parts, 0, 700)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=70) | st.text(alphabet="abcz09_.-AZ é\x00", max_size=70).map(str.encode))
def test_native_type_name_check_is_the_configs_pattern(name):
    """invalid_type_name (native, per type in a batch) and the config's
    TYPE_NAME_PATTERN accept exactly the same names."""
    import re

    matches = re.fullmatch(protocol.TYPE_NAME_PATTERN.strip("^$"), name.decode("latin-1")) is not None
    assert fp.valid_type_name(name) == matches
