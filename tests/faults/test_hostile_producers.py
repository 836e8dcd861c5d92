"""Producers that misbehave without breaking the protocol: they must not cost
the others their events, and the daemon's memory must stay bounded.

The daemon runs as its own process so its RSS can be read; the misbehaving
clients are raw sockets in this process; a well-behaved SDK producer streams
alongside and must get every event persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct

import msgspec
import psutil
import pytest

from conftest import make_config, read_ids, serve_daemon
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.kafka.embedded import free_port
from eventbroker.protocol import Hello


@pytest.fixture
def daemon_proc(tmp_path, kafka_bootstrap):
    # Small buffers, so "bounded" has a number: 32 MiB for everything.
    cfg = make_config(kafka_bootstrap, {"play": {"ring_bytes": 8 << 20}}, server={"memory_budget_bytes": 32 << 20})
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = serve_daemon(conf, port, log)
    try:
        yield f"127.0.0.1:{port}", psutil.Process(proc.pid), cfg.types["play"].topic
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def _good_producer(addr: str, n: int, tag: bytes) -> set[bytes]:
    async with Producer(addr, client_id="good") as p:
        futs = [await p.send("play", tag + b"-%d" % i) for i in range(n)]
        await p.flush(timeout_s=60)
        return {f.result() for f in futs}


def _batch_frame(seq: int, n: int = 500, size: int = 1000) -> bytes:
    enc = fp.BatchEncoder()
    for i in range(n):
        enc.add(b"play", struct.pack(">QQ", 0xBAD0000 + seq, i + 1), 1, None, b"b" * size)
    return enc.finish(seq)


def _check_delivered(kafka_bootstrap: str, topic: str, ids: set[bytes]) -> None:
    # The misbehaving clients write to the same topic: look for these ids.
    assert read_ids(kafka_bootstrap, topic, ids) == ids


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_producer_that_never_reads_its_acks(daemon_proc, kafka_bootstrap):
    """It sends batches as fast as it can and never reads: its events fill at
    most the type's buffer (then get retry-later it never reads), and once its
    ACKs fill the socket the daemon stops reading from it (flow control)."""
    addr, proc, topic = daemon_proc
    host, port = addr.rsplit(":", 1)
    rss0 = proc.memory_info().rss
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    sock.sendall(Hello("deaf").encode())
    sent_bytes = 0

    async def flood() -> None:
        nonlocal sent_bytes
        loop = asyncio.get_running_loop()
        seq = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(4):
                while True:
                    seq += 1
                    frame = _batch_frame(seq, n=50, size=100)
                    await loop.sock_sendall(sock, frame)
                    sent_bytes += len(frame)

    ids, _ = await asyncio.gather(_good_producer(addr, 3000, b"good"), flood())
    rss1 = proc.memory_info().rss
    sock.close()
    print(f"\ndeaf producer: pushed {sent_bytes >> 10} KiB before the daemon stopped reading it; "
          f"daemon RSS +{(rss1 - rss0) >> 20} MiB")
    assert rss1 - rss0 < (32 + 32) << 20  # the budget plus a fixed margin
    _check_delivered(kafka_bootstrap, topic, ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_half_a_frame_then_silence(daemon_proc, kafka_bootstrap):
    addr, proc, topic = daemon_proc
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    frame = _batch_frame(1)
    writer.write(Hello("staller").encode() + frame[: len(frame) // 2])
    await writer.drain()
    ids = await _good_producer(addr, 3000, b"good")
    assert not reader.at_eof()  # the staller is merely waited for
    writer.close()
    _check_delivered(kafka_bootstrap, topic, ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_5000_idle_connections(daemon_proc, kafka_bootstrap):
    addr, proc, topic = daemon_proc
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 5200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below 5,200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 12_000)), hard))
    rss0 = proc.memory_info().rss
    socks = []
    try:
        for i in range(5000):
            s = socket.create_connection((host, int(port)))
            if i % 2:
                s.sendall(Hello(f"idle-{i}").encode())  # half of them finish the handshake
            socks.append(s)
        await asyncio.sleep(1.0)
        conns = sum(1 for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)
        rss1 = proc.memory_info().rss
        ids = await _good_producer(addr, 3000, b"good")
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"\n5000 idle connections: daemon holds {conns} established, RSS +{(rss1 - rss0) >> 20} MiB")
    assert conns >= 5000
    assert rss1 - rss0 < 256 * 1024 * 1024
    _check_delivered(kafka_bootstrap, topic, ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_rapid_connect_disconnect_churn(daemon_proc, kafka_bootstrap):
    addr, proc, topic = daemon_proc
    host, port = addr.rsplit(":", 1)
    rss0 = proc.memory_info().rss
    hello = Hello("churn").encode()
    cycles = 0

    async def churn(worker: int) -> None:
        nonlocal cycles
        for i in range(200):
            reader, writer = await asyncio.open_connection(host, int(port))
            if (worker + i) % 3:
                writer.write(hello + (_batch_frame(i + 1, n=5, size=50) if i % 2 else b""))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.transport.abort() if i % 4 == 0 else writer.close()
            cycles += 1

    results = await asyncio.gather(_good_producer(addr, 3000, b"good"), *(churn(w) for w in range(10)))
    ids = results[0]
    await asyncio.sleep(1.0)
    conns = sum(1 for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)
    rss1 = proc.memory_info().rss
    print(f"\nchurn: {cycles} connect/disconnect cycles; afterwards {conns} connections open, "
          f"daemon RSS +{(rss1 - rss0) >> 20} MiB")
    assert cycles == 2000
    assert conns <= 3  # every churned connection was cleaned up (Kafka's may remain)
    assert rss1 - rss0 < 64 * 1024 * 1024
    _check_delivered(kafka_bootstrap, topic, ids)
