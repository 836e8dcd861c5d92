"""Attacks found by an independent attack test, each tried over real sockets
against a real daemon and broker (issue 16)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time

import pytest

from conftest import daemon_address
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.ops.admin_http import http_request
from eventbroker.protocol import MAX_HELLO_BYTES, Ack, ErrorCode, ErrorFrame, FrameType, Hello, Reason, Status

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


def _attack_with_many_types(port: int, stop: threading.Event, counts: dict) -> None:
    """Batches of 4,096 unknown types, as fast as the socket takes them (its
    ACKs read by a second thread, so the gateway never stops reading it)."""
    enc = fp.BatchEncoder()
    for i in range(4096):
        enc.add(b"junk%04d" % i, struct.pack(">QQ", 7, i + 1), 1, None, b"j")
    frame = enc.finish(1)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(Hello("attacker").encode())

    def drain() -> None:
        with contextlib.suppress(OSError):
            while s.recv(1 << 20):
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        while not stop.is_set():
            s.sendall(frame)
            counts["batches"] += 1
    except OSError:
        pass
    finally:
        s.close()


async def _ack_latencies(p: Producer, seconds: float) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        await asyncio.wait_for(await p.send("play", b"good"), 10)
        out.append(time.monotonic() - t0)
        await asyncio.sleep(0.01)
    return out


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_batches_of_thousands_of_unknown_types_do_not_stall_others(daemon_factory):
    """One producer floods batches listing 4,096 unknown types. The parts of
    unknown types are answered natively, so a batch costs the gateway about
    as much as its bytes: a well-behaved producer beside it keeps its
    connection (idle timeout 1 s, heartbeats every 250 ms) and its ACKs come
    promptly. Prints the good producer's p99 ACK latency without and with the attack."""
    from eventbroker.config import LimitsConfig

    async with daemon_factory({"play": {}}, limits=LimitsConfig(idle_timeout_ms=1000)) as d:
        async with Producer(daemon_address(d), linger_ms=0, heartbeat_interval_ms=250) as p:
            quiet = await _ack_latencies(p, 2.0)
            stop, counts = threading.Event(), {"batches": 0}
            attacker = threading.Thread(target=_attack_with_many_types, args=(d.server.port, stop, counts))
            attacker.start()
            try:
                attacked = await _ack_latencies(p, 3.0)
            finally:
                stop.set()
                await asyncio.to_thread(attacker.join, 10)
            assert p.reconnects == 0, "the well-behaved producer was dropped"
        junk = d.router.stats.rejected.get(("<unknown>", Reason.UNKNOWN_TYPE), 0)
    p99 = lambda xs: sorted(xs)[int(len(xs) * 0.99) - 1] * 1000  # noqa: E731
    print(f"\ngood producer p99 ack latency: {p99(quiet):.1f} ms quiet, {p99(attacked):.1f} ms while "
          f"{counts['batches']} batches of 4,096 unknown types arrived ({junk} junk events rejected)")
    assert counts["batches"] > 50 and junk >= 4096 * 50  # the attack really ran
    assert p99(attacked) < 1000, "ACKs of the good producer were held up by the attack"


def _hello_head(body_bytes: int) -> bytes:
    """The 12-byte header of a HELLO frame announcing ``body_bytes`` (the checksum is never reached)."""
    return struct.pack(">IBBHI", body_bytes, FrameType.HELLO, 0, 0, 0)


async def _error(reader: asyncio.StreamReader, timeout_s: float = 5) -> ErrorFrame | None:
    try:
        head = await asyncio.wait_for(reader.readexactly(12), timeout_s)
        return ErrorFrame.decode(await reader.readexactly(struct.unpack(">I", head[:4])[0]))
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return None


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_handshakes_hold_little_memory(daemon_factory):
    """Before its HELLO a connection may send no frame larger than a HELLO
    can be, and partial HELLOs together are bounded (limits.max_handshake_bytes):
    past it a new one is refused, while complete HELLOs still pass."""
    from eventbroker.config import LimitsConfig

    async with daemon_factory({"play": {}}, limits=LimitsConfig(max_handshake_bytes=MiB)) as d:
        port = d.server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_hello_head(MAX_HELLO_BYTES + 1))  # allowed by max_frame_bytes (1 MiB), not by a HELLO
        err = await _error(reader)
        writer.close()
        assert err is not None and err.code == ErrorCode.BAD_HANDSHAKE and str(MAX_HELLO_BYTES) in err.message
        held = []
        for _ in range(40):  # 40 x 60 kB of unfinished HELLOs: 2.4 MB asked, 1 MiB allowed
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(_hello_head(65_000) + b"h" * 60_000)
            await w.drain()
            held.append((r, w))
        await asyncio.sleep(0.5)
        assert d.server.handshake_bytes <= MiB
        refused = [e for e in await asyncio.gather(*(_error(r, 2) for r, _ in held)) if e is not None]
        assert refused and all(e.code == ErrorCode.CONNECTION_LIMIT for e in refused)
        assert d.security.stats.refused_handshake_budget == len(refused)
        async with Producer(daemon_address(d), linger_ms=1) as p:  # a whole HELLO needs no buffer
            assert await asyncio.wait_for(await p.send("play", b"fine"), 10)
        for _, w in held:
            w.close()
        assert await _until(lambda: d.server.handshake_bytes == 0, 5)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_refused_connections_and_admin_floods_hold_no_descriptors(daemon_factory):
    """Connections over the per-address limit are closed within a fraction of
    a second; the admin port closes connections past its own bound at once."""
    from eventbroker.config import LimitsConfig

    async with daemon_factory({"play": {}}, limits=LimitsConfig(max_connections_per_address=2)) as d:
        port = d.server.port
        keep = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        t0 = time.monotonic()
        flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        ends = await asyncio.gather(*(r.read() for r, _ in flood))  # ERROR frame, then the server's close
        took = time.monotonic() - t0
        assert all(ErrorFrame.decode(e[12:]).code == ErrorCode.CONNECTION_LIMIT for e in ends)
        assert took < 1.0, f"100 refused connections took {took:.2f}s to be closed"
        for _, w in keep + flood:
            w.close()
        host, aport = d.admin.address.rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(aport)) for _ in range(100)]  # never send a request
        await asyncio.sleep(0.3)
        assert d.admin.open_connections <= 64 and d.admin.refused_connections >= 36
        status, body = await http_request(d.admin.address, "GET", "/healthz")  # still answered
        assert status == 200, body
        for _, w in idle:
            w.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_producer_with_a_bad_clock_loses_only_its_own_events(daemon_factory, kafka_bootstrap):
    """Timestamps two hours ahead are refused at the edge (invalid_timestamp)
    for that producer; the type stays healthy for everyone else."""
    from conftest import read_ids
    from eventbroker.errors import EventRejected

    async with daemon_factory({"play": {}}) as d:
        topic = d.router.lanes["play"].etype.topic
        async with Producer(daemon_address(d), linger_ms=1) as bad, Producer(daemon_address(d), linger_ms=1) as good:
            ahead = int(time.time() * 1000) + 2 * 3600 * 1000
            with pytest.raises(EventRejected) as ei:
                await asyncio.wait_for(await bad.send("play", b"from the future", timestamp_ms=ahead), 10)
            assert ei.value.reason == "invalid_timestamp"
            ids = [await asyncio.wait_for(await good.send("play", b"now"), 10) for _ in range(50)]
        assert d.router.lanes["play"].stats.sheds == 0
    assert read_ids(kafka_bootstrap, topic, set(ids)) == set(ids)


def test_a_client_id_with_a_newline_forges_no_log_line(tmp_path, kafka_bootstrap):
    """The text log format escapes what a peer chose (here its client id)."""
    import subprocess
    import sys

    from conftest import make_config, write_config
    from eventbroker.kafka.embedded import free_port, wait_for_port

    conf = write_config(tmp_path, make_config(kafka_bootstrap, {"play": {}}))
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "eventbroker.cli", "--log-format", "text", "serve",
                                 "--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(Hello("evil\n2026-12-02 00:00:00,000 CRITICAL eventbroker: FORGED").encode())
            s.sendall(fp.encode_frame(FrameType.WELCOME, b""))  # a frame producers may not send: logged, closed
            with contextlib.suppress(OSError):
                while s.recv(65536):
                    pass
        deadline = time.monotonic() + 10
        while b"FORGED" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    lines = log.read_text().splitlines()
    assert any("FORGED" in line for line in lines)
    assert not any(line.startswith("2026-12-02 00:00:00,000 CRITICAL") for line in lines), lines


async def _reused_seq_flood(port: int, stop: asyncio.Event) -> None:
    reader, writer = await _open(port)
    frame = _batch(7, 1, 10_000, 5)
    drain = asyncio.ensure_future(reader.read(-1))
    try:
        while not stop.is_set():
            writer.write(frame)
            await writer.drain()
            await asyncio.sleep(0.002)
    finally:
        writer.close()
        drain.cancel()


async def _bad_hellos(port: int, stop: asyncio.Event) -> None:
    while not stop.is_set():  # from another address, as a neighbour would
        with contextlib.suppress(OSError):
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            w.write(Hello("guess", auth=b"ebt1.checkout." + b"A" * 43).encode())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.read(100), 1)
            w.close()
        await asyncio.sleep(0.01)


async def _partial_hellos(port: int, stop: asyncio.Event) -> None:
    held = []
    while not stop.is_set():
        with contextlib.suppress(OSError):
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
            w.write(_hello_head(65_000) + b"h" * 60_000)
            held.append(w)
        await asyncio.sleep(0.005)
    for w in held:
        w.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_good_producer_beside_the_attacks(daemon_factory):
    """Attacks 1, 3 and 4 of the attack test at once (a reused batch_seq flood,
    bad HELLOs from a neighbour, partial HELLOs), with item 2's many-type
    batches from a thread: the well-behaved producer stays connected and its
    ACKs stay prompt. Prints its p99 ACK latency without and with them."""
    from eventbroker.config import AuthConfig, AuthProducer, LimitsConfig
    from eventbroker.security.tokens import create_token

    token, digest = create_token("good")
    auth = AuthConfig(required=False, max_failures_per_minute=3,
                      producers={"good": AuthProducer(token_hashes=[digest], types=["*"])})
    limits = LimitsConfig(idle_timeout_ms=1000, max_inflight_bytes_per_connection=MiB)
    async with daemon_factory({"play": {}}, limits=limits, auth=auth) as d:
        async with Producer(daemon_address(d), linger_ms=0, heartbeat_interval_ms=250, token=token) as p:
            quiet = await _ack_latencies(p, 2.0)
            stop, thread_stop, counts = asyncio.Event(), threading.Event(), {"batches": 0}
            port = d.server.port
            attacks = [asyncio.ensure_future(f(port, stop)) for f in (_reused_seq_flood, _bad_hellos, _partial_hellos)]
            many = threading.Thread(target=_attack_with_many_types, args=(port, thread_stop, counts))
            many.start()
            try:
                attacked = await _ack_latencies(p, 3.0)
            finally:
                stop.set()
                thread_stop.set()
                await asyncio.gather(*attacks, return_exceptions=True)
                await asyncio.to_thread(many.join, 10)
            assert p.reconnects == 0, "the well-behaved producer was dropped"
        sec = d.security.stats
    p99 = lambda xs: sorted(xs)[int(len(xs) * 0.99) - 1] * 1000  # noqa: E731
    print(f"\ngood producer p99 ack latency: {p99(quiet):.1f} ms quiet, {p99(attacked):.1f} ms beside the attacks "
          f"({counts['batches']} many-type batches, {sec.auth_failures} bad HELLOs, {sec.auth_refused_addresses} "
          f"lock-outs, {sec.refused_handshake_budget} partial HELLOs refused)")
    assert sec.auth_refused_addresses >= 1 and counts["batches"] > 20  # the attacks really ran
    assert p99(attacked) < 1000
