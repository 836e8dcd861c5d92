"""The SDK's native send path (``_fastpath.ProducerCore``, ``OutBatch``):
frames, limits, ids, what an ACK entry marks, resends out of sent frames."""

from __future__ import annotations

import struct
import time

import pytest

from eventbroker import _fastpath as fp
from eventbroker.errors import BufferFull, EventRejected, ProducerClosed, UsageError
from eventbroker.protocol import decode_batch

PREFIX = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def core(batch_max_bytes: int = 1 << 20, max_buffered: int = 1000) -> fp.ProducerCore:
    return fp.ProducerCore(PREFIX, batch_max_bytes, max_buffered)


def events(b: fp.OutBatch):
    crc_ok = fp.crc32c(b.frame[4:8] + b.frame[12:]) == struct.unpack(">I", b.frame[8:12])[0]
    assert crc_ok and b.frame[4] == fp.FRAME_EVENT_BATCH
    assert struct.unpack(">I", b.frame[:4])[0] == len(b.frame) - 12
    seq, evs = decode_batch(b.frame[12:])
    assert seq == b.seq
    return evs


def test_events_are_encoded_as_given_with_generated_ids_and_clock():
    c = core()
    t0 = int(time.time() * 1000)
    c.produce("play", b'{"a":1}', b"user-1")
    c.produce("search", bytearray(b"q"), None, 1234)
    c.produce("play", memoryview(b"xyz"), memoryview(b"k"), None, b"\xaa" * 16, 3)
    assert c.count == 3 and c.unresolved == 3 and c.produced == 3
    c.seal()
    [b] = c.take_sealed()
    evs = events(b)
    assert [(e.type, e.key, e.payload) for e in evs] == [
        ("play", b"user-1", b'{"a":1}'), ("search", None, b"q"), ("play@3", b"k", b"xyz")]
    assert evs[0].event_id == PREFIX + (1).to_bytes(8, "big")
    assert evs[1].event_id == PREFIX + (2).to_bytes(8, "big")
    assert evs[2].event_id == b"\xaa" * 16
    assert t0 <= evs[0].timestamp_ms <= int(time.time() * 1000) and evs[1].timestamp_ms == 1234
    assert b.type_names == [b"play", b"search", b"play@3"] and b.count == b.left == 3
    assert [b.event_id(i) for i in range(3)] == [e.event_id for e in evs]
    assert b.event_type(2) == b"play@3"


def test_the_frame_is_the_one_the_load_generators_encoder_makes():
    c = core()
    enc = fp.BatchEncoder()
    for i in range(50):
        eid = bytes([1 + i]) * 16
        c.produce(f"t{i % 3}", b"p%d" % i, b"k" if i % 2 else None, 1000 + i, eid)
        enc.add(b"t%d" % (i % 3), eid, 1000 + i, b"k" if i % 2 else None, b"p%d" % i)
    c.seal()
    assert c.take_sealed()[0].frame == enc.finish(1)


def test_bad_arguments_add_nothing():
    c = core()
    for args, match in [
        (("", b"x"), "1..255"), (("x" * 256, b"x"), "1..255"), ((b"play", b"x"), "str"),
        (("play", b"x", b"k" * 65536), "key longer"),
        (("play", b"x", None, None, b"\x00" * 16), "not all zero"), (("play", b"x", None, None, b"short"), "16 bytes"),
        (("play", b"x", None, None, None, 0), "positive"), (("play", b"x", None, None, None, True), "positive"),
    ]:
        with pytest.raises(UsageError, match=match):
            c.produce(*args)
    with pytest.raises(TypeError):
        c.produce("play", "not bytes")
    c.max_event_bytes = 10
    with pytest.raises(EventRejected, match="too_large"):
        c.produce("play", b"x" * 11)
    assert c.count == 0 and c.unresolved == 0 and c.produced == 0


def test_buffer_full_and_closed():
    c = core(max_buffered=3)
    for _ in range(3):
        c.produce("play", b"x")
    with pytest.raises(BufferFull):
        c.produce("play", b"x")
    c.resolved(1)
    c.produce("play", b"x")
    c.closed = True
    with pytest.raises(ProducerClosed):
        c.produce("play", b"x")
    c.closed_error = RuntimeError("fatal")
    with pytest.raises(RuntimeError, match="fatal"):
        c.produce("play", b"x")
    assert c.unresolved == 3


def test_batches_are_sealed_by_size_count_and_frame_limit_with_callbacks():
    c = core(batch_max_bytes=10_000)
    calls = []
    c.on_first = lambda: calls.append("first")
    c.on_sealed = lambda: calls.append("sealed")
    for _ in range(100):
        c.produce("play", b"x" * 968)  # 1000 bytes with the event header
    sealed = c.take_sealed()
    assert [b.count for b in sealed] == [10] * 10 and c.count == 0
    assert calls == ["first", "sealed"] * 10
    c.max_events = 7
    for _ in range(8):
        c.produce("play", b"x")
    assert [b.count for b in c.take_sealed()] == [7] and c.count == 1
    c.max_events = 65536
    c.frame_limit = 2000
    c.produce("play", b"x" * 1800)  # with the open event it would pass the frame limit: sealed first
    assert [b.count for b in c.take_sealed()] == [1] and c.count == 1
    for b in sealed:
        assert len(events(b)) == 10


def test_take_marks_what_an_ack_entry_covers():
    c = core()
    for i in range(10):
        c.produce(("a", "b")[i % 2], b"%d" % i)
    c.seal()
    [b] = c.take_sealed()
    assert b.take(0, (), False) == 5 and b.left == 5  # all of type a, without per-event state
    assert b.take(0, (), False) == 0
    assert b.take(1, (3, 5, 4), True) == [3, 5]  # 4 is of type a: already answered
    assert b.take(1, (3,), True) == []
    assert b.unanswered() == [1, 7, 9]
    assert b.take(1, (), True) == [1, 7, 9] and b.left == 0
    assert b.take(9, (), False) == 0  # a type index the batch does not have


def test_readd_copies_events_out_of_a_sent_frame_with_their_futures():
    c = core()
    futs = [object(), None, object()]
    for i in range(3):
        c.produce("play", b"p%d" % i, b"k%d" % i, 100 + i, None, None, futs[i])
    c.produce("other", b"o")
    c.seal()
    [b] = c.take_sealed()
    assert b.futures == futs + [None]
    c.produce("new", b"n")
    c.readd(b, [2, 0])
    assert c.unresolved == 5  # resends are not counted again
    c.seal()
    [r] = c.take_sealed()
    evs = events(r)
    assert [(e.type, e.payload, e.key, e.timestamp_ms, e.event_id) for e in evs[1:]] == [
        ("play", b"p2", b"k2", 102, b.event_id(2)), ("play", b"p0", b"k0", 100, b.event_id(0))]
    assert r.futures == [None, futs[2], futs[0]]
    with pytest.raises(IndexError):
        c.readd(b, [4])


def test_take_sealed_can_seal_the_open_batch_without_callbacks():
    c = core()
    c.on_sealed = lambda: pytest.fail("no callback")
    c.produce("play", b"x")
    [b] = c.take_sealed(True)
    assert b.count == 1 and c.count == 0 and c.take_sealed() == []


def test_threads_switching_inside_a_change_do_not_corrupt_batches():
    """An allocation can run the garbage collector and, through it, another
    thread's Python code in the middle of a change; the core's lock keeps
    each change whole. Here every collection yields the GIL while one thread
    produces and another seals, as a SyncProducer's caller and loop do."""
    import gc
    import threading

    c = core(batch_max_bytes=4096, max_buffered=10**9)
    stop = threading.Event()

    def switch(phase, info):
        time.sleep(0)  # let the other thread run, mid-change if it can

    def producer():
        i = 0
        while not stop.is_set():
            c.produce(f"t{i % 5}", b"%d" % i, None, None, None, None, object() if i % 7 == 0 else None)
            i += 1

    old = gc.get_threshold()
    gc.callbacks.append(switch)
    gc.set_threshold(5)
    try:
        t = threading.Thread(target=producer)
        t.start()
        sealed = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            c.seal()
            sealed += c.take_sealed()
        stop.set()
        t.join()
    finally:
        gc.callbacks.remove(switch)
        gc.set_threshold(*old)
    sealed += c.take_sealed(True)
    assert len(sealed) > 100
    assert [b.seq for b in sealed] == list(range(1, len(sealed) + 1))
    total = 0
    for b in sealed:
        evs = events(b)
        assert len(evs) == b.count > 0
        assert b.futures is None or len(b.futures) == b.count
        total += b.count
    assert total == c.produced == c.unresolved
