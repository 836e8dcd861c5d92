"""Raw-protocol load generator: pre-encoded EVENT_BATCH frames over N connections.

Frames are built before the clock starts (one type per frame, types rotated,
unique event ids), so the generator's CPU goes to the socket and to reading
ACKs, and the daemon is measured without SDK overhead. Payloads carry the
event's index, so an independent consumer can checksum what landed.

Modes: a fixed number of events (``--events``), or a fixed time
(``--duration``, cycling through the pre-encoded frames); ``--rate`` paces the
offered load (events/s over all connections) for latency runs.

Prints one JSON line. Run: python benchmarks/loadgen.py --server 127.0.0.1:7480
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import orjson

from eventbroker import _fastpath as fp
from eventbroker.protocol import Ack, FrameType, Hello, Status


def payload_for(index: int, size: int) -> bytes:
    head = struct.pack(">Q", index)
    return head + b"x" * max(0, size - len(head)) if size >= 8 else head[:size]


_CONTEXTS = ("album", "playlist", "radio", "search", "other")


def json10_for(index: int) -> bytes:
    """A realistic 10-field JSON event (about 220 bytes), unique per index; the
    `schema` scenario validates it against benchmarks/schemas/bench/1.json."""
    return (b'{"user":"u%010d","track":%d,"ms_played":%d,"context":"%s","offline":%s,"device":"ios",'
            b'"country":"SE","ts":"2026-12-02T11:%02d:%02d.%03dZ","session":"6f1c2a9e-4d2b-4c8e-9a51-%012x",'
            b'"seq":%d}' % (index % 10_000_000_000, index % 1_000_003, (index * 7919) % 400_000,
                            _CONTEXTS[index % 5].encode(), b"true" if index % 9 == 0 else b"false",
                            (index // 60000) % 60, (index // 1000) % 60, index % 1000, index & 0xFFFFFFFFFFFF, index))


def json10p_for(index: int) -> bytes:
    """The privacy scenario's event (about 230 bytes): 100,000 distinct users and two personal
    fields, client_ip and email (benchmarks/schemas/private/1.json marks them)."""
    u = index % 100_000
    return (b'{"user":"u%06d","track":%d,"ms_played":%d,"context":"%s","offline":%s,"device":"ios",'
            b'"country":"SE","ts":"2026-12-02T11:%02d:%02d.%03dZ","client_ip":"10.%d.%d.%d",'
            b'"email":"listener%06d@example.org"}' % (
                u, index % 1_000_003, (index * 7919) % 400_000, _CONTEXTS[index % 5].encode(),
                b"true" if index % 9 == 0 else b"false", (index // 60000) % 60, (index // 1000) % 60,
                index % 1000, u >> 16, (u >> 8) & 255, u & 255, u))


def build_frames(n_events: int, batch_events: int, event_bytes: int, types: list[str], conn_id: int, tag: int,
                 payload: str = "bytes"):
    """Frames for one connection: [(frame, n_events, type_name)]; also the
    payload checksum (sum of CRC-32C) of all events, for verification."""
    prefix = struct.pack(">II", tag, conn_id)
    enc = fp.BatchEncoder()
    frames = []
    made = 0
    seq = 0
    checksum = 0
    ts = int(time.time() * 1000)
    while made < n_events:
        t = types[seq % len(types)]
        tb = t.encode()
        n = min(batch_events, n_events - made)
        for i in range(n):
            idx = made + i + 1
            body = (payload_for((conn_id << 32) | idx, event_bytes) if payload == "bytes"
                    else json10_for((conn_id << 32) | idx) if payload == "json10"
                    else json10p_for((conn_id << 32) | idx))
            checksum += fp.crc32c(body)
            enc.add(tb, prefix + struct.pack(">Q", idx), ts, None, body)
        seq += 1
        frames.append((enc.finish(seq), n, t))
        made += n
    return frames, checksum


class Stats:
    def __init__(self) -> None:
        self.acked: Counter[str] = Counter()
        self.rejected = 0
        self.retries = 0
        self.latencies: list[float] = []
        self.timeline: list[tuple[float, dict[str, int]]] = []


class Conn(asyncio.Protocol):
    def __init__(self, stats: Stats, frames, window: int, interval_s: float, cycle: bool) -> None:
        self.stats = stats
        self.frames = frames
        self.window = window
        self.interval_s = interval_s
        self.cycle = cycle
        self.next = 0
        self.seq = 0
        self.inflight: dict[int, tuple[int, int, float]] = {}  # seq -> (frame index, events, sent at)
        self.resends = 0  # frames answered retry-later, waiting for their retry_after_ms
        self.reader = fp.FrameReader(64 << 20)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.welcome = loop.create_future()
        self.can_write = True
        self.stopping = False
        self.next_due = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(Hello(f"loadgen-{os.getpid()}").encode())

    def _send(self, fi: int, now: float) -> None:
        frame, n, _t = self.frames[fi]
        self.seq += 1
        if self.seq != fi + 1:  # cycling: rewrite the batch sequence number
            frame = _with_seq(frame, self.seq)
        self.inflight[self.seq] = (fi, n, now)
        self.transport.write(frame)

    def pump(self) -> None:
        now = time.perf_counter()
        while self.can_write and not self.stopping and len(self.inflight) < self.window:
            if self.next >= len(self.frames):
                if not self.cycle:
                    break
                self.next = 0
            if self.interval_s:
                if now < self.next_due:
                    asyncio.get_running_loop().call_at(
                        asyncio.get_running_loop().time() + (self.next_due - now), self.pump
                    )
                    return
                self.next_due = max(self.next_due + self.interval_s, now - self.interval_s)
            self._send(self.next, now)
            self.next += 1
        self._check_done()

    def _check_done(self) -> None:
        finished = self.stopping or (not self.cycle and self.next >= len(self.frames))
        if finished and not self.inflight and (self.stopping or not self.resends) and not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        r = self.reader
        r.feed(data)
        while (t := r.next_frame()) >= 0:
            if t == FrameType.ACK:
                ack = Ack.decode(r.body())
                fi, n, sent_at = self.inflight.pop(ack.batch_seq)
                e = ack.entries[0]
                if e.status == Status.PERSISTED:
                    self.stats.acked[self.frames[fi][2]] += n
                    self.stats.latencies.append(time.perf_counter() - sent_at)
                elif e.status == Status.RETRY_LATER:
                    self.stats.retries += 1
                    self.resends += 1
                    asyncio.get_running_loop().call_later(e.retry_after_ms / 1000, self.resend, fi)
                else:
                    self.stats.rejected += n
            elif t == FrameType.WELCOME:
                self.welcome.set_result(None)
            elif t == FrameType.ERROR:
                print("server error frame:", r.body(), file=sys.stderr)
        self.pump()

    def resend(self, fi: int) -> None:
        self.resends -= 1
        if self.transport is not None and not self.transport.is_closing():
            self._send(fi, time.perf_counter())
        self._check_done()

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        self.pump()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


def _with_seq(frame: bytes, seq: int) -> bytes:
    body = bytearray(frame[12:])
    struct.pack_into(">Q", body, 0, seq)
    return fp.encode_frame(FrameType.EVENT_BATCH, body)


async def run_sdk(args: argparse.Namespace) -> dict:
    """The same load through the producer SDK, what a service using
    eventbroker.client pays: one Producer per connection, and per event either
    ``produce()`` (``--client sdk``: no object per event, counted by
    ``flush()``) or ``await send()`` (``--client sdk-send``: a future per
    event). Every event has a key (one of 1024) and an id the SDK generates."""
    from eventbroker.client import BufferFull, Producer

    types = args.types.split(",")
    per_conn = max(1, args.events // args.connections)
    payloads = [payload_for(i, args.event_bytes) for i in range(min(per_conn, 4096))]
    keys = [b"user-%04d" % i for i in range(1024)]
    producers = [Producer(args.server, linger_ms=2, max_inflight_batches=args.window,
                          batch_max_bytes=args.batch_events * (args.event_bytes + 48)) for _ in range(args.connections)]
    for p in producers:
        await p.start()
        await p.wait_connected(30)
    if args.ready_file:
        Path(args.ready_file).write_text("ready")  # noqa: ASYNC240 - before the clock starts
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    acked: Counter[str] = Counter()
    rejected = [0]
    n_types = len(types)
    be = args.batch_events

    async def with_produce(p) -> None:
        produce = p.produce
        i = 0
        while i < per_conn:
            t = types[(i // be) % n_types]
            end = min(per_conn, i + be)
            try:
                while i < end:
                    produce(t, payloads[i & 4095], key=keys[i & 1023])
                    i += 1
            except BufferFull:
                await p.wait_for_space()
            await asyncio.sleep(0)  # let acks in between type runs
        report = await p.flush()
        rejected[0] += report.rejected + report.failed

    async def with_send(p) -> None:
        futs = []
        for i in range(per_conn):
            t = types[(i // be) % n_types]
            futs.append((t, await p.send(t, payloads[i & 4095], key=keys[i & 1023])))
            if i % be == be - 1:
                await asyncio.sleep(0)  # as with produce(): acks come in between type runs
        await p.flush()
        for t, f in futs:
            if f.exception():
                rejected[0] += 1
            else:
                acked[t] += 1

    latencies: list[float] = []

    async def paced(p) -> None:
        """``--rate``: produce() at a steady pace (a tick per millisecond),
        timing every 64th event from produce() to its acknowledgement."""
        produce = p.produce
        per_s = args.rate / len(producers)
        t_start = time.perf_counter()
        i = 0
        while i < per_conn:
            due = min(per_conn, int((time.perf_counter() - t_start) * per_s))
            while i < due:
                if i & 63:
                    produce(types[(i // be) % n_types], payloads[i & 4095], key=keys[i & 1023])
                else:
                    t_sent = time.perf_counter()
                    produce(types[(i // be) % n_types], payloads[i & 4095], key=keys[i & 1023],
                            on_delivery=lambda _eid, exc, t_sent=t_sent: latencies.append(time.perf_counter() - t_sent))
                i += 1
            await asyncio.sleep(0.001)
        report = await p.flush()
        rejected[0] += report.rejected + report.failed

    if args.rate:
        run_one = paced
    else:
        run_one = with_send if args.client == "sdk-send" else with_produce
    await asyncio.gather(*(run_one(p) for p in producers))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lat = sorted(latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

    if args.client != "sdk-send":  # produce() counts; the types' shares follow the rotation
        for c in range(per_conn):
            acked[types[(c // be) % n_types]] += len(producers)
        if rejected[0]:
            raise SystemExit(f"{rejected[0]} events not persisted")
    for p in producers:
        await p.close()
    n = sum(acked.values())
    return {"events_acked": n, "acked_by_type": dict(acked), "events_offered": per_conn * args.connections,
            "payload_checksum": None, "events_rejected": rejected[0], "retry_later_batches": 0,
            "unanswered_batches": 0, "id_tags": [int.from_bytes(p.id_prefix[:4], "big") for p in producers],
            "seconds": round(elapsed, 4), "events_per_s": round(n / elapsed), "loadgen_cpu_s": round(cpu, 3),
            "ack_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999)}, "timeline": []}


async def run(args: argparse.Namespace) -> dict:
    if args.client in ("sdk", "sdk-send"):
        return await run_sdk(args)
    host, port = args.server.rsplit(":", 1)
    types = args.types.split(",")
    conns_n = args.connections
    per_conn = max(1, args.events // conns_n)
    stats = Stats()
    built = [build_frames(per_conn, args.batch_events, args.event_bytes, types, c, args.tag, args.payload)
             for c in range(conns_n)]
    checksum = sum(c for _, c in built)
    interval_s = 0.0
    if args.rate:
        interval_s = args.batch_events / (args.rate / conns_n)
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    cycle = args.duration is not None
    for frames, _ in built:
        _, c = await loop.create_connection(
            lambda f=frames: Conn(stats, f, args.window, interval_s, cycle), host, int(port)
        )
        conns.append(c)
    await asyncio.gather(*(c.welcome for c in conns))
    if args.ready_file:
        Path(args.ready_file).write_text("ready")  # noqa: ASYNC240 - before the clock starts
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for c in conns:
        c.pump()
    if cycle:
        end = t0 + args.duration
        while time.perf_counter() < end:
            await asyncio.sleep(min(0.25, end - time.perf_counter()))
            stats.timeline.append((round(time.perf_counter() - t0, 3), dict(stats.acked)))
        for c in conns:
            c.stopping = True
            c._check_done()
        await asyncio.wait([c.done for c in conns], timeout=args.drain_timeout)
    else:
        await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for c in conns:
        c.transport.close()
    lat = sorted(stats.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

    acked = sum(stats.acked.values())
    return {
        "events_acked": acked,
        "acked_by_type": dict(stats.acked),
        "events_offered": per_conn * conns_n if not cycle else None,
        "payload_checksum": checksum if not cycle else None,
        "events_rejected": stats.rejected,
        "retry_later_batches": stats.retries,
        "unanswered_batches": sum(len(c.inflight) for c in conns),
        "seconds": round(elapsed, 4),
        "events_per_s": round(acked / elapsed),
        "loadgen_cpu_s": round(cpu, 3),
        "ack_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999)},
        "timeline": stats.timeline,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True)
    p.add_argument("--events", type=int, default=1_000_000, help="events to send (per run, all connections)")
    p.add_argument("--duration", type=float, help="send for this many seconds instead, cycling the frames")
    p.add_argument("--rate", type=float, help="offered load, events/s over all connections")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--batch-events", type=int, default=2000)
    p.add_argument("--event-bytes", type=int, default=200)
    p.add_argument("--types", default="play,search,client_log")
    p.add_argument("--payload", choices=["bytes", "json10", "json10p"], default="bytes",
                   help="bytes: --event-bytes of filler; json10: a 10-field JSON event (the schema scenario); "
                   "json10p: 10 fields, 100,000 users, two personal fields (the privacy scenario)")
    p.add_argument("--window", type=int, default=8, help="in-flight batches per connection")
    p.add_argument("--tag", type=int, default=os.getpid(), help="first 4 bytes of every event id")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--ready-file", help="written once all connections are up, before sending")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--client", choices=["raw", "sdk", "sdk-send"], default="raw",
                   help="raw: pre-encoded frames; sdk: eventbroker.client.Producer, produce() per event; "
                        "sdk-send: await send() per event")
    args = p.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
