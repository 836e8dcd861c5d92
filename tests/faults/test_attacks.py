"""Attacks found by an independent attack test, each tried over real sockets
against a real daemon and broker (issue 16)."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from conftest import daemon_address
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.protocol import Ack, FrameType, Hello, Status

MiB = 1024 * 1024


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(Hello("attacker").encode())
    head = await asyncio.wait_for(reader.readexactly(12), 10)
    await reader.readexactly(struct.unpack(">I", head[:4])[0])
    assert head[4] == FrameType.WELCOME
    return reader, writer


def _batch(seq: int, n: int, size: int, salt: int) -> bytes:
    enc = fp.BatchEncoder()
    for i in range(n):
        enc.add(b"play", struct.pack(">QQ", salt, i + 1), 1, None, b"p" * size)
    return enc.finish(seq)


async def _ack(reader: asyncio.StreamReader, timeout_s: float) -> Ack:
    while True:
        head = await asyncio.wait_for(reader.readexactly(12), timeout_s)
        body = await reader.readexactly(struct.unpack(">I", head[:4])[0])
        if head[4] == FrameType.ACK:
            return Ack.decode(body)


async def _until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return cond()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_reused_batch_seq_leaks_nothing(daemon_factory):
    """The in-flight byte count is kept per accepted batch, not per the
    producer's batch_seq: reusing one number many times never leaves the
    connection stuck over max_inflight_bytes_per_connection, and when the
    attacker leaves, its address may connect again."""
    limits = {"max_inflight_bytes_per_connection": MiB, "max_connections_per_address": 1}
    from eventbroker.config import LimitsConfig

    async with daemon_factory({"play": {}}, limits=LimitsConfig(**limits)) as d:
        reader, writer = await _open(d.server.port)
        for i in range(300):  # 300 x 10 kB in flight under one batch_seq: 3 MB
            writer.write(_batch(7, 1, 10_000, i))
        persisted = 0
        while persisted < 300:  # over the 1 MiB limit reading pauses, and resumes as the ACKs come
            ack = await _ack(reader, 10)
            assert ack.batch_seq == 7 and all(e.status == Status.PERSISTED for e in ack.entries), ack
            persisted += sum(e.count for e in ack.entries)
        writer.write(_batch(8, 1, 400_000, 99))  # a leak would leave the count over the limit: never read
        ack = await _ack(reader, 10)
        assert ack.batch_seq == 8 and ack.entries[0].status == Status.PERSISTED
        writer.close()
        assert await _until(lambda: d.server.stats.connections == 0, 5), "the attacker's connection is still counted"
        async with Producer(daemon_address(d), linger_ms=1) as p:  # the same address, limit 1
            assert await asyncio.wait_for(await p.send("play", b"legitimate"), 10)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_connection_stuck_unread_is_closed_and_its_hangup_noticed(daemon_factory, proxied_broker):
    """Kafka away, a producer over its in-flight limit is not read from; it
    hangs up. The transport never sees that FIN by itself: the listener asks
    the socket and reads the stream to its end, and a connection not read
    from for the idle timeout is closed; either way it stops counting against
    the limits long before its type would be handed back (stall_timeout_ms)."""
    from eventbroker.config import LimitsConfig

    proxy, _broker = proxied_broker
    limits = LimitsConfig(max_inflight_bytes_per_connection=MiB, idle_timeout_ms=1000)
    async with daemon_factory({"play": {}}, limits=limits, kafka={"bootstrap_servers": f"127.0.0.1:{proxy.port}",
                                                                  "stall_timeout_ms": 60_000,
                                                                  "request_timeout_ms": 60_000}) as d:
        proxy.cut()
        reader, writer = await _open(d.server.port)
        for i in range(3):  # 3 x 700 kB accepted, none answered: over the limit, reading stops
            writer.write(_batch(i + 1, 2, 350_000, i))
        await writer.drain()
        assert await _until(lambda: d.security.stats.inflight_pauses >= 1, 10)
        writer.close()  # FIN; nothing left unread on our side
        t0 = time.monotonic()
        assert await _until(lambda: d.server.stats.connections == 0, 15), "still counted after the peer left"
        assert time.monotonic() - t0 < 15  # stall_timeout_ms is 60 s
        proxy.heal()
