"""Raw-protocol load generator: pre-encoded EVENT_BATCH frames over N connections.

Frames are built before the clock starts (unique event ids, one type per
frame, types rotated), so the generator spends its CPU on the socket and on
reading ACKs, and the daemon's cost can be measured without SDK overhead.

Prints one JSON line: events acked, seconds, ack latency percentiles.
Run: python benchmarks/loadgen.py --server 127.0.0.1:7480 --events 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from pathlib import Path

import orjson

from eventbroker import _fastpath as fp
from eventbroker.protocol import Ack, FrameType, Hello, Status


def build_frames(n_events: int, batch_events: int, event_bytes: int, types: list[str], conn_id: int) -> list[tuple[bytes, int]]:
    prefix = struct.pack(">II", os.getpid(), conn_id)
    enc = fp.BatchEncoder()
    frames = []
    payload_base = b"x" * event_bytes
    made = 0
    seq = 0
    ts = int(time.time() * 1000)
    while made < n_events:
        t = types[seq % len(types)].encode()
        n = min(batch_events, n_events - made)
        for i in range(n):
            eid = prefix + struct.pack(">Q", made + i + 1)
            enc.add(t, eid, ts, None, payload_base)
        seq += 1
        frames.append((enc.finish(seq), n))
        made += n
    return frames


class Conn(asyncio.Protocol):
    def __init__(self, gen: Generator, frames: list[tuple[bytes, int]]) -> None:
        self.gen = gen
        self.frames = frames
        self.next = 0
        self.inflight: dict[int, tuple[int, float]] = {}
        self.reader = fp.FrameReader(64 << 20)
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.welcome = asyncio.get_running_loop().create_future()
        self.can_write = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(Hello(f"loadgen-{os.getpid()}").encode())

    def start(self) -> None:
        self.pump()

    def pump(self) -> None:
        window = self.gen.window
        now = time.perf_counter()
        while self.can_write and self.next < len(self.frames) and len(self.inflight) < window:
            frame, n = self.frames[self.next]
            self.inflight[self.next + 1] = (n, now)
            self.next += 1
            self.transport.write(frame)
        if self.next >= len(self.frames) and not self.inflight and not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        r = self.reader
        r.feed(data)
        while (t := r.next_frame()) >= 0:
            if t == FrameType.ACK:
                ack = Ack.decode(r.body())
                n, sent_at = self.inflight.pop(ack.batch_seq)
                e = ack.entries[0]
                if e.status == Status.PERSISTED:
                    self.gen.acked += n
                    self.gen.latencies.append(time.perf_counter() - sent_at)
                elif e.status == Status.RETRY_LATER:
                    self.gen.retries += 1
                    seq = ack.batch_seq
                    asyncio.get_running_loop().call_later(e.retry_after_ms / 1000, self.resend, seq, n)
                else:
                    self.gen.rejected += n
            elif t == FrameType.WELCOME:
                self.welcome.set_result(None)
            elif t == FrameType.ERROR:
                print("server error frame:", r.body(), file=sys.stderr)
        self.pump()

    def resend(self, seq: int, n: int) -> None:
        self.inflight[seq] = (n, time.perf_counter())
        self.transport.write(self.frames[seq - 1][0])

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        self.pump()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


class Generator:
    def __init__(self, window: int) -> None:
        self.window = window
        self.acked = 0
        self.rejected = 0
        self.retries = 0
        self.latencies: list[float] = []


async def run(args: argparse.Namespace) -> dict:
    host, port = args.server.rsplit(":", 1)
    types = args.types.split(",")
    per_conn = args.events // args.connections
    gen = Generator(args.window)
    frames = [build_frames(per_conn, args.batch_events, args.event_bytes, types, c) for c in range(args.connections)]
    loop = asyncio.get_running_loop()
    conns = []
    for f in frames:
        _, c = await loop.create_connection(lambda f=f: Conn(gen, f), host, int(port))
        conns.append(c)
    await asyncio.gather(*(c.welcome for c in conns))
    if args.ready_file:
        Path(args.ready_file).write_text("ready")  # noqa: ASYNC240 - before the clock starts
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for c in conns:
        c.start()
    await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for c in conns:
        c.transport.close()
    lat = sorted(gen.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

    return {
        "events_acked": gen.acked,
        "events_rejected": gen.rejected,
        "retry_later_batches": gen.retries,
        "seconds": round(elapsed, 4),
        "events_per_s": round(gen.acked / elapsed),
        "loadgen_cpu_s": round(cpu, 3),
        "ack_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999)},
        "batches": len(lat),
        "event_ids": [f"{os.getpid()}:{c}" for c in range(args.connections)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--batch-events", type=int, default=2000)
    p.add_argument("--event-bytes", type=int, default=200)
    p.add_argument("--types", default="play,search,client_log")
    p.add_argument("--window", type=int, default=8, help="in-flight batches per connection")
    p.add_argument("--ready-file", help="written once all connections are up, before sending")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
