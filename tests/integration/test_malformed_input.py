"""Hostile and broken producers over real sockets.

Each bad input gets an ERROR frame with its code and a closed connection,
while a well-behaved producer on another connection loses nothing.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from conftest import daemon_address, read_topic, record_headers
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.protocol import Ack, ErrorCode, ErrorFrame, FrameType, Hello, Status, Welcome, encode_frame


async def _exchange(addr: str, payload: bytes, *, half_close: bool = False, timeout_s: float = 10.0):
    """Send raw bytes, read everything until the server closes; return frames."""
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    if half_close:
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(-1), timeout_s)  # until EOF: the server closed
    writer.close()
    fr = fp.FrameReader(1 << 20)
    fr.feed(data)
    frames = []
    while (t := fr.next_frame()) >= 0:
        frames.append((t, fr.body()))
    assert fr.buffered_bytes == 0, "server sent a partial frame"
    return frames


def _hello() -> bytes:
    return Hello("tester").encode()


def _batch(events=((b"play", b"payload"),), seq: int = 1) -> bytes:
    enc = fp.BatchEncoder()
    for i, (t, v) in enumerate(events):
        enc.add(t, struct.pack(">QQ", 7, i + 1), 1_700_000_000_000, None, v)
    return enc.finish(seq)


def _corrupt_checksum(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[-1] ^= 0xFF
    return bytes(b)


def _raw_frame(ftype: int, body: bytes, reserved: bytes = b"\x00\x00\x00") -> bytes:
    header = struct.pack(">IB", len(body), ftype) + reserved
    crc = fp.crc32c(body, fp.crc32c(header[4:8]))
    return header + struct.pack(">I", crc) + body


def _truncated_batch_body() -> bytes:
    # A well-framed EVENT_BATCH whose event claims more payload than the body has.
    full = _batch()
    body = full[12:]
    return encode_frame(FrameType.EVENT_BATCH, body[:-3])


CASES = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, ErrorCode.BAD_HANDSHAKE, id="http-garbage"),
    pytest.param(_batch(), False, ErrorCode.BAD_HANDSHAKE, id="batch-before-hello"),
    pytest.param(
        encode_frame(FrameType.HELLO, b"NOPE\x00\x01\x00\x00\x00\x00\x00\x00"), False, ErrorCode.BAD_HANDSHAKE,
        id="bad-magic",
    ),
    pytest.param(Hello("x", version=2).encode(), False, ErrorCode.UNSUPPORTED_VERSION, id="bad-version"),
    pytest.param(_hello() + _corrupt_checksum(_batch()), False, ErrorCode.BAD_CHECKSUM, id="bad-checksum"),
    pytest.param(_hello() + struct.pack(">IB3sI", 50_000_000, 3, b"\0\0\0", 0), False, ErrorCode.FRAME_TOO_LARGE,
                 id="frame-over-limit"),
    pytest.param(_hello() + _raw_frame(42, b"x"), False, ErrorCode.UNKNOWN_FRAME_TYPE, id="unknown-frame-type"),
    pytest.param(_hello() + _raw_frame(3, b"x", b"\x01\x00\x00"), False, ErrorCode.MALFORMED_FRAME,
                 id="reserved-bits"),
    pytest.param(_hello() + _truncated_batch_body(), False, ErrorCode.MALFORMED_FRAME, id="event-past-frame"),
    pytest.param(_hello() + _batch()[:-5], True, ErrorCode.TRUNCATED_STREAM, id="half-frame-then-eof"),
    pytest.param(_hello() + encode_frame(FrameType.ACK, b""), False, ErrorCode.UNEXPECTED_FRAME,
                 id="server-only-frame"),
]


@pytest.mark.parametrize(("payload", "half_close", "code"), CASES)
async def test_bad_input_gets_error_frame_and_close(daemon_factory, kafka_bootstrap, payload, half_close, code):
    async with daemon_factory() as d:
        addr = daemon_address(d)
        # A good producer streams while the bad one misbehaves.
        async with Producer(addr, client_id="good") as good:
            futs = [await good.send("play", b"good-%d" % i) for i in range(500)]
            frames = await _exchange(addr, payload, half_close=half_close)
            futs += [await good.send("play", b"good-%d" % i) for i in range(500, 1000)]
            await good.flush()
            ids = {f.result() for f in futs}
        topic = d.router.lanes["play"].etype.topic
        assert d.server.stats.protocol_errors == 1
    assert frames, "no answer before the close"
    ftype, body = frames[-1]
    assert ftype == FrameType.ERROR
    err = ErrorFrame.decode(body)
    assert err.code == code, err.message
    assert err.message
    # The well-behaved producer lost nothing, and the bad bytes reached no topic.
    got = read_topic(kafka_bootstrap, topic, 1000)
    assert {record_headers(m)["eb.id"] for m in got} == ids
    assert len(got) == 1000


async def test_handshake_answers_welcome_with_limits(daemon_factory):
    async with daemon_factory(server={"max_frame_bytes": 65536, "max_event_bytes": 4096}) as d:
        host, port = daemon_address(d).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_hello())
        head = await reader.readexactly(12)
        body = await reader.readexactly(struct.unpack(">I", head[:4])[0])
        writer.close()
    assert head[4] == FrameType.WELCOME
    w = Welcome.decode(body)
    assert (w.max_frame_bytes, w.max_event_bytes, w.version) == (65536, 4096, 1)


async def test_heartbeat_is_echoed(daemon_factory):
    async with daemon_factory() as d:
        host, port = daemon_address(d).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_hello() + encode_frame(FrameType.HEARTBEAT, struct.pack(">Q", 99)))
        fr = fp.FrameReader(1 << 20)
        got = []
        while len(got) < 2:
            fr.feed(await asyncio.wait_for(reader.read(65536), 5))
            while (t := fr.next_frame()) >= 0:
                got.append((t, fr.body()))
        writer.close()
    assert got[0][0] == FrameType.WELCOME
    assert got[1] == (FrameType.HEARTBEAT, struct.pack(">Q", 99))


async def test_half_close_still_gets_owed_acks(daemon_factory, kafka_bootstrap):
    """A producer that sends its batches and shuts down its sending side still
    receives every ACK before the server closes."""
    async with daemon_factory() as d:
        batches = b"".join(
            _batch([(b"play", b"p%d" % i), (b"search", b"s%d" % i)], seq=i + 1) for i in range(20)
        )
        frames = await _exchange(daemon_address(d), _hello() + batches, half_close=True)
        topic = d.router.lanes["play"].etype.topic
    assert frames[0][0] == FrameType.WELCOME
    acks = [Ack.decode(body) for t, body in frames if t == FrameType.ACK]
    answered: dict[int, int] = {}
    for a in acks:
        for e in a.entries:
            assert e.status == Status.PERSISTED
            answered[a.batch_seq] = answered.get(a.batch_seq, 0) + e.count
    assert answered == {seq: 2 for seq in range(1, 21)}
    assert len(read_topic(kafka_bootstrap, topic, 20)) == 20


async def test_empty_batch_gets_empty_ack(daemon_factory):
    async with daemon_factory() as d:
        enc = fp.BatchEncoder()
        enc.type_index(b"play")
        frames = await _exchange(daemon_address(d), _hello() + enc.finish(5), half_close=True)
    assert [t for t, _ in frames] == [FrameType.WELCOME, FrameType.ACK]
    assert Ack.decode(frames[1][1]) == Ack(5, ())
