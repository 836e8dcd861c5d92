"""Compressed producer connections (HELLO/WELCOME codec bits, compressed
EVENT_BATCH bodies) over real sockets: delivery into the broker, producers that
do not ask are unaffected, and hostile bodies (decompression bombs, lies about
the size, garbage) get an ERROR frame while other producers lose nothing."""

from __future__ import annotations

import asyncio
import resource
import struct

import cramjam
import pytest

from conftest import daemon_address, read_topic, record_headers
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.protocol import (
    FLAG_COMPRESS_LZ4,
    FLAG_COMPRESS_ZSTD,
    FLAG_REJECTION_DETAILS,
    FRAME_FLAG_COMPRESSED,
    Ack,
    ErrorCode,
    ErrorFrame,
    FrameType,
    Hello,
    Status,
    Welcome,
    compress_batch_frame,
)


def _batch(n: int = 200, seq: int = 1) -> bytes:
    enc = fp.BatchEncoder()
    for i in range(n):
        enc.add(b"play", struct.pack(">QQ", 9, seq * 100_000 + i + 1), 1_700_000_000_000, None,
                b'{"n":%d,"text":"the same words again and again"}' % i)
    return enc.finish(seq)


class Raw:
    """A producer speaking the protocol by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, addr: str, flags: int) -> tuple[Raw, Welcome]:
        host, port = addr.rsplit(":", 1)
        r = cls(*await asyncio.open_connection(host, int(port)))
        r.writer.write(Hello("raw", flags=flags).encode())
        ftype, body = await r.frame()
        assert ftype == FrameType.WELCOME
        return r, Welcome.decode(body)

    async def frame(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(12), 10)
        n, ftype = struct.unpack(">IB", head[:5])
        return ftype, await asyncio.wait_for(self.reader.readexactly(n), 10)

    async def error(self) -> ErrorFrame:
        ftype, body = await self.frame()
        assert ftype == FrameType.ERROR, ftype
        err = ErrorFrame.decode(body)
        assert await asyncio.wait_for(self.reader.read(), 10) == b""  # then the server closed
        return err


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
async def test_sdk_over_a_compressed_connection(daemon_factory, kafka_bootstrap, codec):
    async with daemon_factory({"play": {}}) as d, Producer(daemon_address(d), compression=codec) as p:
        for i in range(20_000):
            p.produce("play", b'{"user":"u%06d","context":"album","offline":false}' % (i % 5000))
        report = await p.flush(30)
        assert p._codec == {"zstd": FLAG_COMPRESS_ZSTD, "lz4": FLAG_COMPRESS_LZ4}[codec]
        prefix = p.id_prefix
        topic = d.router.lanes["play"].etype.topic
    assert report.persisted == 20_000
    got = read_topic(kafka_bootstrap, topic, 20_000)
    assert {record_headers(m)["eb.id"] for m in got} == {prefix + i.to_bytes(8, "big") for i in range(1, 20_001)}


async def test_negotiation_and_producers_that_do_not_ask(daemon_factory):
    async with daemon_factory({"play": {}}) as d:
        addr = daemon_address(d)
        r, w = await Raw.connect(addr, FLAG_REJECTION_DETAILS)
        assert w.flags == FLAG_REJECTION_DETAILS  # no codec offered, none granted
        r.writer.write(_batch(seq=1))  # plain frames as ever
        ftype, body = await r.frame()
        assert ftype == FrameType.ACK and Ack.decode(body).entries[0].status == Status.PERSISTED
        r.writer.write(compress_batch_frame(_batch(seq=2), FLAG_COMPRESS_ZSTD))  # never negotiated
        err = await r.error()
        assert err.code == ErrorCode.MALFORMED_FRAME and "reserved frame header bits" in err.message

        r, w = await Raw.connect(addr, FLAG_COMPRESS_ZSTD | FLAG_COMPRESS_LZ4)
        assert w.flags == FLAG_COMPRESS_ZSTD  # one codec: zstd
        frame = compress_batch_frame(_batch(seq=3), FLAG_COMPRESS_ZSTD)
        assert len(frame) < len(_batch(seq=3)) / 3
        r.writer.write(frame)
        r.writer.write(_batch(seq=4))  # uncompressed frames stay allowed
        for _ in range(2):
            ftype, body = await r.frame()
            assert ftype == FrameType.ACK and Ack.decode(body).entries[0].count == 200
        r.writer.close()


def _compressed(body_len: int, payload: bytes, codec_flag: int = FLAG_COMPRESS_ZSTD) -> bytes:
    return fp.encode_frame(FrameType.EVENT_BATCH, struct.pack(">I", body_len) + payload, FRAME_FLAG_COMPRESSED)


def _zstd_bomb(gib: int) -> bytes:
    c = cramjam.zstd.Compressor(level=1)
    chunk = b"\x00" * (64 << 20)
    for _ in range(gib * 16):
        c.compress(chunk)
    return bytes(c.finish())


async def test_hostile_compressed_bodies_get_an_error_frame(daemon_factory, kafka_bootstrap):
    """A 4 GiB zstd bomb in a 130 kB frame is cut off at max_frame_bytes
    without the daemon's memory growing; a length over the limit is refused
    before anything is allocated; lies and garbage are malformed. A producer
    on another connection meanwhile loses nothing."""
    bomb = _zstd_bomb(4)
    assert len(bomb) < 200_000
    lz4_big = bytes(cramjam.lz4.compress_block(b"\x00" * (8 << 20), store_size=False))
    body = _batch()[12:]
    cases = [
        (FLAG_COMPRESS_ZSTD, _compressed(1 << 20, bomb), ErrorCode.MALFORMED_FRAME, "does not decompress"),
        (FLAG_COMPRESS_LZ4, _compressed(1 << 20, lz4_big), ErrorCode.MALFORMED_FRAME, "does not decompress"),
        (FLAG_COMPRESS_ZSTD, _compressed(0xFFFFFFFF, bomb), ErrorCode.FRAME_TOO_LARGE, "over max_frame_bytes"),
        (FLAG_COMPRESS_ZSTD, _compressed(len(body) + 1, bytes(cramjam.zstd.compress(body))),
         ErrorCode.MALFORMED_FRAME, "does not decompress"),
        (FLAG_COMPRESS_LZ4, _compressed(100, b"\xff" * 64), ErrorCode.MALFORMED_FRAME, "does not decompress"),
        (FLAG_COMPRESS_ZSTD, fp.encode_frame(FrameType.EVENT_BATCH, b"\x00\x01", FRAME_FLAG_COMPRESSED),
         ErrorCode.MALFORMED_FRAME, "shorter than its length field"),
    ]
    async with daemon_factory({"play": {}}, server={"max_frame_bytes": 1 << 20}) as d, \
            Producer(daemon_address(d), linger_ms=1) as good:
        addr = daemon_address(d)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        futs = []
        for flag, frame, code, text in cases:
            futs += [await good.send("play", b"good-%d" % len(futs)) for _ in range(50)]
            r, w = await Raw.connect(addr, flag)
            assert w.flags & flag
            r.writer.write(frame)
            err = await r.error()
            assert (err.code, text in err.message) == (code, True), err
        await good.flush(30)
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert rss_growth_mb < 256, f"peak memory grew by {rss_growth_mb:.0f} MB"
        ids = [f.result() for f in futs]
        topic = d.router.lanes["play"].etype.topic
    got = read_topic(kafka_bootstrap, topic, len(ids))
    assert {record_headers(m)["eb.id"] for m in got} == set(ids)


def test_an_incompressible_batch_is_sent_as_it_is():
    """Compressing random payloads would make the frame bigger (and could pass
    max_frame_bytes): the frame goes uncompressed, which 4.3.1 allows."""
    import os

    enc = fp.BatchEncoder()
    for i in range(16):
        enc.add(b"play", struct.pack(">QQ", 9, i + 1), 1, None, os.urandom(16_000))
    frame = enc.finish(1)
    for flag in (FLAG_COMPRESS_ZSTD, FLAG_COMPRESS_LZ4):
        assert compress_batch_frame(frame, flag) is frame
    assert compress_batch_frame(_batch(), FLAG_COMPRESS_LZ4)[5] == FRAME_FLAG_COMPRESSED
